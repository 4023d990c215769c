//! Exponential back-off with jitter, shared by the source and the sink.

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

/// Run `op` until it succeeds: after each failure, `failed` hears of it (log it, mark the stage
/// unhealthy) and the next attempt waits out a [`Backoff`], giving way to `cancel`. The one
/// "retry until it works or we stop" loop of the engine.
///
/// # Errors
/// [`Cancelled`] when `cancel` fired while backing off.
pub async fn until_ok<T, E, F: std::future::Future<Output = Result<T, E>>>(cancel: &CancellationToken, mut op: impl FnMut() -> F, mut failed: impl FnMut(&E)) -> Result<T, Cancelled> {
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                failed(&e);
                backoff.wait(cancel).await?;
            }
        }
    }
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
