//! Time is injected: everything asks a [`Clock`], and only [`RealClock`] reads the system time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use duet_messages::dap09::{Duration, Time};

/// A source of the current time, in whole seconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Time;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealClock;

impl Clock for RealClock {
    #[allow(clippy::disallowed_methods)] // The one place that may read the system time.
    fn now(&self) -> Time {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Time(secs)
    }
}

/// A clock for tests: it stands still until advanced.
#[derive(Clone, Debug, Default)]
pub struct MockClock(Arc<AtomicU64>);

impl MockClock {
    /// A clock showing `t`.
    pub fn new(t: Time) -> Self {
        Self(Arc::new(AtomicU64::new(t.0)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.0, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, t: Time) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for MockClock {
    fn now(&self) -> Time {
        Time(self.0.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now(&self) -> Time {
        (**self).now()
    }
}
