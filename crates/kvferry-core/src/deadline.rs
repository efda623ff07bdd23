//! Deadlines: every wait in kvferry is bounded by one.

use std::time::{Duration, Instant};

/// Where deadline logic reads the time: the system's monotonic clock, or in a test one it moves
/// by hand, so that what happens at and past a deadline is tested without waiting for it.
pub(crate) trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the system.
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A point in time after which an operation gives up. There is no "forever": callers that really
/// want a long wait say how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(timeout: Duration) -> Self {
        Deadline(Instant::now() + timeout)
    }

    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.remaining_on(&SystemClock)
    }

    pub fn expired(&self) -> bool {
        self.expired_on(&SystemClock)
    }

    /// Time left as `clock` tells it.
    pub(crate) fn remaining_on(&self, clock: &dyn Clock) -> Duration {
        self.0.saturating_duration_since(clock.now())
    }

    pub(crate) fn expired_on(&self, clock: &dyn Clock) -> bool {
        clock.now() >= self.0
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        std::cmp::min(self, other)
    }
}
