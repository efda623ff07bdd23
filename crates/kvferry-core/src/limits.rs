//! What a peer can make an agent spend: connections, threads, memory before validation, queued
//! notifications, peers. Each limit is a setting with a default sized for a cluster of a few
//! hundred engines; `kvferry info` shows them.

use crate::sync::Locked;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The limits of one serving endpoint (the TCP transport, the side channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// Threads serving requests, whatever the number of connections.
    pub workers: usize,
    /// Threads running handshakes, so that clients stalling in theirs never hold up requests.
    pub handshake_workers: usize,
    /// Connections open at once; further ones are closed as they are accepted.
    pub max_connections: usize,
    /// Connections that have not proven the cluster secret yet; a new one beyond this replaces the
    /// oldest that has sent nothing.
    pub max_unauthenticated: usize,
    /// Connections open at once from one IP address.
    pub max_per_ip: usize,
    /// From accept to a proven cluster secret.
    pub handshake_timeout: Duration,
    /// An authenticated connection that sends no request for this long after its handshake is
    /// closed (one that has sent requests stays open between them).
    pub idle_timeout: Duration,
    /// Bytes held, over all connections, by requests still being read (descriptors, notifications,
    /// side-channel bodies): memory committed before a request is validated.
    pub request_bytes: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            workers: 4,
            handshake_workers: 2,
            max_connections: 4096,
            max_unauthenticated: 128,
            max_per_ip: 1024,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            request_bytes: 64 << 20,
        }
    }
}

/// The limits of an agent as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLimits {
    /// The side channel's endpoint.
    pub side_channel: ServeLimits,
    /// Notifications received and not yet taken; a sender beyond this gets `PeerBusy`.
    pub max_notifications: usize,
    /// Bytes of notifications received and not yet taken.
    pub max_notification_bytes: u64,
    /// Peers added through the side channel (by their EXCHANGE); one more is refused as busy once
    /// none of them can expire.
    pub max_peers: usize,
    /// A peer added through the side channel that has moved no transfer and exchanged nothing for
    /// this long is forgotten.
    pub peer_idle_timeout: Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            side_channel: ServeLimits::default(),
            max_notifications: 4096,
            max_notification_bytes: 64 << 20,
            max_peers: 1024,
            peer_idle_timeout: Duration::from_secs(600),
        }
    }
}

/// A shared budget of bytes; reservations give theirs back when dropped.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, used: AtomicU64::new(0) })
    }

    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// An empty reservation, grown as bytes arrive.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }
}

#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Take `n` more bytes; `false` (and nothing taken) when the budget has not that many left.
    pub fn grow(&mut self, n: u64) -> bool {
        let taken = self.budget.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(n).filter(|&total| total <= self.budget.limit)
        });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// At most one log line per interval for one kind of event, with the count of those left out:
/// a peer that makes an event repeat (a flood of refused connections, an fd limit) cannot flood
/// the log.
pub(crate) struct LogLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub const fn per_second() -> LogLimiter {
        LogLimiter { interval: Duration::from_secs(1), state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line may be logged now, `suppressed` being how many were left out
    /// since the last; `None` when this one is to be left out.
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.locked();
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_it_has_not_and_takes_back_what_is_dropped() {
        let budget = Budget::new(100);
        let mut a = budget.reservation();
        assert!(a.grow(60));
        let mut b = budget.reservation();
        assert!(!b.grow(41));
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_log_limiter_counts_what_it_leaves_out() {
        let limiter = LogLimiter::per_second();
        assert_eq!(limiter.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limiter.allow(), None);
        }
        assert_eq!(limiter.state.locked().1, 1000);
    }
}
