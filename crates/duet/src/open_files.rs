//! The process's limit on open files, raised for a server's connections.
//!
//! Each connection a server holds is an open file, besides its database connections, the
//! SQLite files and its listeners. The usual soft limit, 1,024 (systemd's default for services),
//! is below the default `max_connections` (4,096), and past it the server cannot accept more:
//! `accept` fails with "too many open files". The hard limit is usually far higher (systemd:
//! 524,288), and a process may raise its soft limit up to it, as Go's runtime does for every
//! program; `duet serve` raises its own to what its settings need.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Open files a server needs besides its connections: database connections, SQLite's files,
/// listeners, connections to the peer aggregator, logs.
pub const BESIDES_CONNECTIONS: u64 = 1024;

/// What [`raise`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The soft limit was already at least what was wanted.
    Enough { limit: u64 },
    /// The soft limit was raised to what was wanted.
    Raised { from: u64, to: u64 },
    /// The hard limit is below what was wanted: the soft limit is now the hard limit.
    Short { limit: u64, wanted: u64 },
}

/// Raises the soft limit on open files to `wanted`, or as close as the hard limit allows. A limit
/// of "unlimited" counts as enough.
pub fn raise(wanted: u64) -> std::io::Result<Outcome> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let Some(soft) = current else {
        return Ok(Outcome::Enough { limit: u64::MAX });
    };
    if soft >= wanted {
        return Ok(Outcome::Enough { limit: soft });
    }
    let to = maximum.map_or(wanted, |hard| hard.min(wanted));
    if to > soft {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(to),
                maximum,
            },
        )?;
    }
    Ok(if to >= wanted {
        Outcome::Raised { from: soft, to }
    } else {
        Outcome::Short {
            limit: to.max(soft),
            wanted,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft limit goes up to what is wanted, and no further than the hard limit; a limit
    /// already high enough is left alone.
    #[test]
    fn the_soft_limit_is_raised_up_to_the_hard_limit() {
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        let (Some(soft), Some(hard)) = (current, maximum) else {
            // Unlimited: nothing to raise.
            return;
        };
        assert_eq!(raise(soft).expect("raise"), Outcome::Enough { limit: soft });
        if soft < hard {
            assert_eq!(
                raise(soft + 1).expect("raise"),
                Outcome::Raised {
                    from: soft,
                    to: soft + 1
                }
            );
            assert_eq!(getrlimit(Resource::Nofile).current, Some(soft + 1));
        }
        let now = getrlimit(Resource::Nofile).current.expect("limited");
        if hard < u64::MAX {
            assert_eq!(
                raise(hard + 1).expect("raise"),
                Outcome::Short {
                    limit: hard,
                    wanted: hard + 1
                }
            );
            assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        }
        assert!(getrlimit(Resource::Nofile).current >= Some(now));
    }
}
