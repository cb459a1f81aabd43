//! Throwaway PostgreSQL databases for tests, on the server `DATABASE_URL` names (a role that may
//! create databases; `scripts/test` starts a throwaway cluster and sets it).

use std::future::Future;

use sqlx::{Connection, Executor, PgConnection};

/// The server to test against, or `None` (with a message saying why `test` is skipped).
pub fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Some(url),
        Ok(other) => {
            println!("skipping {test}: DATABASE_URL ({other}) is not a postgres:// URL");
            None
        }
        Err(_) => {
            println!(
                "skipping {test}: DATABASE_URL is not set \
                 (scripts/test starts a throwaway PostgreSQL and sets it)"
            );
            None
        }
    }
}

/// Runs `body` with the URL of a new, empty database, and drops the database afterwards, whether
/// `body` passed or panicked. Without `DATABASE_URL` it prints why and returns.
pub async fn with_fresh_database<F, Fut>(test: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(admin_url) = database_url(test) else {
        return;
    };
    let name = format!("duet_test_{:016x}", rand::random::<u64>());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("connect to DATABASE_URL");
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("CREATE DATABASE");
    // On its own task, so that a panic comes back here as an error and the database is dropped.
    let outcome = tokio::spawn(body(with_database(&admin_url, &name))).await;
    admin
        .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
        .await
        .expect("DROP DATABASE");
    admin.close().await.expect("close admin connection");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// `url` naming database `name` instead: the path replaced, the query (if any) kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    // After the scheme's "//", the authority runs to the first '/', if any.
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "t"),
            "postgres://u:p@h:5432/t"
        );
        assert_eq!(with_database("postgres://h", "t"), "postgres://h/t");
        assert_eq!(
            with_database("postgresql://h/db?sslmode=disable", "t"),
            "postgresql://h/t?sslmode=disable"
        );
    }
}
