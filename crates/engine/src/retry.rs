//! Exponential back-off with jitter, and the one retry loop ([`retry`], [`until_ok`]) every
//! stage uses.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Back-off state: 100 ms doubling to 30 s, each wait jittered by up to ±20 % so many workers
/// recovering from one outage do not retry in lock-step.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    seed: u64,
    base: Duration,
    max: Duration,
}

/// The wait was cut short by cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled while backing off")]
pub struct Cancelled;

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Back-off from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self {
            attempt: 0,
            seed,
            base,
            max,
        }
    }

    /// Failures since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Forget failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay (advances the attempt count).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let capped = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: cheap, good enough for jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = (self.seed % 401) as f64 / 1000.0 - 0.2; // -0.2 ..= +0.2
        capped.mul_f64(1.0 + jitter)
    }

    /// Sleep for the next delay unless `cancel` fires first.
    ///
    /// # Errors
    /// [`Cancelled`] when cancelled.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = cancel.cancelled() => Err(Cancelled),
        }
    }
}

/// How [`retry`] paces and bounds its attempts: back-off from 100 ms doubling to 30 s (or to
/// [`Pace::capped`]), giving way to a cancellation token when there is one, and stopping before
/// a wait that would end past a deadline when there is one.
#[derive(Debug, Clone, Copy)]
pub struct Pace<'a> {
    cancel: Option<&'a CancellationToken>,
    max: Duration,
    deadline: Option<tokio::time::Instant>,
}

impl<'a> Pace<'a> {
    /// Retry until `cancel` fires.
    pub fn until_cancelled(cancel: &'a CancellationToken) -> Self {
        Self { cancel: Some(cancel), ..Self::unbounded() }
    }

    /// Retry for as long as failures are retriable (the caller has no cancellation to give
    /// way to).
    pub fn unbounded() -> Self {
        Self { cancel: None, max: Duration::from_secs(30), deadline: None }
    }

    /// Waits grow to at most `max`.
    #[must_use]
    pub fn capped(self, max: Duration) -> Self {
        Self { max, ..self }
    }

    /// Give up rather than wait past `deadline`.
    #[must_use]
    pub fn deadline(self, deadline: tokio::time::Instant) -> Self {
        Self { deadline: Some(deadline), ..self }
    }
}

/// Why [`retry`] stopped without a success; each carries the last failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped<E> {
    /// The pace's cancellation token fired while backing off.
    Cancelled(E),
    /// `failed` said the failure is not one to retry.
    Refused(E),
    /// The next wait would have ended past the pace's deadline.
    Deadline(E),
}

impl<E> Stopped<E> {
    /// The last failure, whatever stopped the retrying.
    pub fn into_inner(self) -> E {
        match self {
            Self::Cancelled(e) | Self::Refused(e) | Self::Deadline(e) => e,
        }
    }
}

/// The one "retry until it works" loop of the engine: run `op` until it succeeds. After each
/// failure `failed` hears of it (log it, mark the stage unhealthy) and answers whether to try
/// again; the next attempt then waits out a [`Backoff`] as `pace` says. Nothing is allocated
/// or timed until a first failure, so a hot path may call it for every item.
///
/// # Errors
/// [`Stopped`], with the last failure: cancelled, refused by `failed`, or out of time.
pub async fn retry<T, E, F: std::future::Future<Output = Result<T, E>>>(pace: Pace<'_>, mut op: impl FnMut() -> F, mut failed: impl FnMut(&E) -> bool) -> Result<T, Stopped<E>> {
    let mut waits = Waits::new(pace);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => waits.after(e, &mut failed).await?,
        }
    }
}

/// [`retry`] for an operation whose attempts share `state`, each borrowing it while it runs:
/// a read that hands on what it finds as it goes, and remembers what it handed on so a retry
/// does not hand it on twice.
///
/// # Errors
/// As [`retry`].
pub async fn retry_with<S, T, E>(
    pace: Pace<'_>,
    state: &mut S,
    mut op: impl for<'s> FnMut(&'s mut S) -> futures_util::future::BoxFuture<'s, Result<T, E>>,
    mut failed: impl FnMut(&E) -> bool,
) -> Result<T, Stopped<E>> {
    let mut waits = Waits::new(pace);
    loop {
        match op(state).await {
            Ok(v) => return Ok(v),
            Err(e) => waits.after(e, &mut failed).await?,
        }
    }
}

/// The waits between a retry loop's attempts.
struct Waits<'a> {
    pace: Pace<'a>,
    backoff: Option<Backoff>,
}

impl<'a> Waits<'a> {
    fn new(pace: Pace<'a>) -> Self {
        Self { pace, backoff: None }
    }

    /// After failure `e`: whether to try again (having waited), or why not.
    async fn after<E>(&mut self, e: E, failed: &mut impl FnMut(&E) -> bool) -> Result<(), Stopped<E>> {
        if !failed(&e) {
            return Err(Stopped::Refused(e));
        }
        let delay = self.backoff.get_or_insert_with(|| Backoff::new(Duration::from_millis(100), self.pace.max)).next_delay();
        if self.pace.deadline.is_some_and(|d| tokio::time::Instant::now() + delay >= d) {
            return Err(Stopped::Deadline(e));
        }
        match self.pace.cancel {
            Some(cancel) => tokio::select! {
                () = tokio::time::sleep(delay) => Ok(()),
                () = cancel.cancelled() => Err(Stopped::Cancelled(e)),
            },
            None => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }
}

/// [`retry`] every failure until `op` succeeds or `cancel` fires; `failed` hears of each.
///
/// # Errors
/// [`Cancelled`] when `cancel` fired while backing off.
pub async fn until_ok<T, E, F: std::future::Future<Output = Result<T, E>>>(cancel: &CancellationToken, op: impl FnMut() -> F, mut failed: impl FnMut(&E)) -> Result<T, Cancelled> {
    // Every failure is retried and there is no deadline: only cancellation stops it.
    retry(Pace::until_cancelled(cancel), op, |e| {
        failed(e);
        true
    })
    .await
    .map_err(|_| Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn until_ok_retries_until_success_and_gives_way_to_cancel() {
        let cancel = CancellationToken::new();
        let mut left = 3;
        let mut heard = 0;
        let mut attempt = || {
            let result = if left == 0 { Ok(7) } else { left -= 1; Err("down") };
            async move { result }
        };
        let got = until_ok(&cancel, &mut attempt, |_| heard += 1).await;
        assert_eq!((got, heard), (Ok(7), 3));
        cancel.cancel();
        let got: Result<(), Cancelled> = until_ok(&cancel, || async { Err::<(), _>("down") }, |_| {}).await;
        assert_eq!(got, Err(Cancelled));
    }

    // Paused time: the waits are measured on tokio's clock, so a loaded machine cannot make
    // a wake-up late.
    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_a_refusal_or_at_the_deadline_with_the_last_failure() {
        let mut calls = 0;
        let got: Result<(), _> = retry(Pace::unbounded(), || {
            calls += 1;
            let e = if calls < 3 { "busy" } else { "refused" };
            async move { Err(e) }
        }, |e| *e == "busy")
        .await;
        assert_eq!((got, calls), (Err(Stopped::Refused("refused")), 3));
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(700);
        let got: Result<(), _> = retry(Pace::unbounded().capped(Duration::from_millis(200)).deadline(deadline), || async { Err("down") }, |_| true).await;
        assert_eq!(got, Err(Stopped::Deadline("down")));
        assert!(tokio::time::Instant::now() < deadline, "it never waits past the deadline");
        assert!(tokio::time::Instant::now() >= start + Duration::from_millis(400), "it retried until close to it");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_with_lets_every_attempt_keep_what_the_ones_before_it_did() {
        let cancel = CancellationToken::new();
        let mut handed_on: Vec<u32> = Vec::new();
        // Each attempt hands on what it reads and fails after the second item; what was
        // handed on is skipped the next time.
        let got = retry_with(Pace::until_cancelled(&cancel), &mut handed_on, |seen| {
            Box::pin(async move {
                for (read, item) in (1..=5).enumerate() {
                    if !seen.contains(&item) {
                        seen.push(item);
                        if read % 2 == 1 {
                            return Err("connection reset");
                        }
                    }
                }
                Ok(seen.len())
            })
        }, |_| true)
        .await;
        assert_eq!(got, Ok(5));
        assert_eq!(handed_on, [1, 2, 3, 4, 5], "nothing handed on twice, nothing skipped");
        let refused: Result<(), _> = retry_with(Pace::until_cancelled(&cancel), &mut handed_on, |_| Box::pin(async { Err("bad query") }), |_| false).await;
        assert_eq!(refused, Err(Stopped::Refused("bad query")));
    }

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(36), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_secs(24), "capped near 30s");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
