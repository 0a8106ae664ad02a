//! When to sync, as kube-proxy's `BoundedFrequencyRunner` paces `syncProxyRules`: a change
//! after a quiet time is applied at once; a burst of changes is batched, at most
//! `minSyncPeriod` apart once the burst allowance is spent (kube-proxy's `burstSyncs` = 2, a
//! token bucket refilled at one sync per `minSyncPeriod`); and every `syncPeriod` a full
//! resync reads the maps back and repairs whatever changed behind the proxy's back.

use std::time::{Duration, Instant};

/// kube-proxy's proxiers pass `burstSyncs := 2` to their sync runner.
const BURST_SYNCS: f64 = 2.0;

/// What the next sync must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Program what changed since the last sync (diffed against what the proxy programmed).
    Changes,
    /// Read back the maps and program every difference (drift repaired).
    Full,
}

/// The sync schedule: pure, driven by the instants it is given.
#[derive(Clone, Debug)]
pub struct SyncPacer {
    min_sync_period: Duration,
    sync_period: Duration,
    /// Syncs that may run now (up to `BURST_SYNCS`), as of `refilled_at`.
    tokens: f64,
    refilled_at: Instant,
    /// A change arrived that no sync has programmed yet.
    pending: bool,
    /// When the next full resync is due.
    full_due: Instant,
}

impl SyncPacer {
    /// A pacer whose burst allowance is full at `now`: the first sync is never held back.
    pub fn new(min_sync_period: Duration, sync_period: Duration, now: Instant) -> SyncPacer {
        SyncPacer {
            min_sync_period,
            sync_period,
            tokens: BURST_SYNCS,
            refilled_at: now,
            pending: false,
            full_due: now + sync_period,
        }
    }

    /// A change arrived: a sync is queued (kube-proxy's `Sync()`).
    pub fn queue(&mut self) {
        self.pending = true;
    }

    pub fn is_pending(&self) -> bool {
        self.pending
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        if self.min_sync_period.is_zero() {
            return BURST_SYNCS;
        }
        let refill = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64()
            / self.min_sync_period.as_secs_f64();
        (self.tokens + refill).min(BURST_SYNCS)
    }

    /// When the next sync is due: a queued change as soon as the burst allowance permits,
    /// else the periodic full resync.
    pub fn next_due(&self, now: Instant) -> Instant {
        if !self.pending {
            return self.full_due;
        }
        let missing = 1.0 - self.tokens_at(now);
        let change_due = if missing <= 0.0 {
            now
        } else {
            now + self.min_sync_period.mul_f64(missing)
        };
        change_due.min(self.full_due)
    }

    /// The sync to run at `now`, if one is due; it is counted as run.
    pub fn take(&mut self, now: Instant) -> Option<SyncKind> {
        let tokens = self.tokens_at(now);
        let kind = if now >= self.full_due {
            SyncKind::Full
        } else if self.pending && tokens >= 1.0 {
            SyncKind::Changes
        } else {
            return None;
        };
        // A full resync programs the queued changes too, and spends a token like any run.
        self.tokens = (tokens - 1.0).max(0.0);
        self.refilled_at = now;
        self.pending = false;
        if kind == SyncKind::Full {
            self.full_due = now + self.sync_period;
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const FULL: Duration = Duration::from_secs(30);

    #[test]
    fn a_change_after_a_quiet_time_is_synced_at_once() {
        let start = Instant::now();
        let mut pacer = SyncPacer::new(MIN, FULL, start);
        assert_eq!(pacer.take(start), None, "nothing queued");
        let later = start + Duration::from_secs(5);
        pacer.queue();
        assert_eq!(pacer.next_due(later), later);
        assert_eq!(pacer.take(later), Some(SyncKind::Changes));
        assert!(!pacer.is_pending());
    }

    #[test]
    fn a_burst_is_batched_at_most_min_sync_period_apart() {
        let start = Instant::now();
        let mut pacer = SyncPacer::new(MIN, FULL, start);
        // Two syncs run back to back (kube-proxy's burst), the third waits a whole period.
        for _ in 0..2 {
            pacer.queue();
            assert_eq!(pacer.take(start), Some(SyncKind::Changes));
        }
        for step in 0..100 {
            pacer.queue();
            let now = start + Duration::from_millis(step);
            assert_eq!(pacer.take(now), None, "held back at {step} ms");
        }
        assert_eq!(pacer.next_due(start), start + MIN);
        assert_eq!(pacer.take(start + MIN), Some(SyncKind::Changes));
        pacer.queue();
        assert_eq!(pacer.next_due(start + MIN), start + 2 * MIN);
    }

    #[test]
    fn sync_period_runs_a_full_resync_even_while_changes_keep_coming() {
        let start = Instant::now();
        let mut pacer = SyncPacer::new(MIN, FULL, start);
        assert_eq!(pacer.next_due(start), start + FULL);
        let mut kinds = Vec::new();
        for second in 1..=31 {
            pacer.queue();
            kinds.extend(pacer.take(start + Duration::from_secs(second)));
        }
        assert_eq!(kinds.iter().filter(|k| **k == SyncKind::Full).count(), 1);
        assert_eq!(
            kinds[29],
            SyncKind::Full,
            "the 30th second's sync is the full one"
        );
        assert_eq!(pacer.next_due(start + FULL + MIN), start + 2 * FULL);
    }

    #[test]
    fn zero_min_sync_period_never_holds_a_change_back() {
        let start = Instant::now();
        let mut pacer = SyncPacer::new(Duration::ZERO, FULL, start);
        for _ in 0..10 {
            pacer.queue();
            assert_eq!(pacer.take(start), Some(SyncKind::Changes));
        }
    }
}
