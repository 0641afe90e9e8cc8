//! The reconnect policy: backoff delays and the rotation over node URLs.
//!
//! Owns [`ReconnectPolicy`] (what the app configures) and [`Backoff`] (the attempt counter and
//! the URL cursor the connection task keeps between attempts). Delays use exponential backoff
//! with full jitter: attempt `n` (from 0) waits a uniformly random time in
//! `[0, min(max_delay, base_delay·2^n)]`, never less than a broker's `retry_after`. The
//! randomness comes from a [`Jitter`] source ([`random_jitter`] in a real client; tests inject
//! a scripted one). It must not sleep or connect: the connection task does both.

use std::time::Duration;

use rand::RngExt;

/// Where backoff delays get their randomness: given a ceiling in ms, a number in
/// `0..=ceiling` (a larger answer is clamped to the ceiling).
pub(crate) type Jitter = Box<dyn FnMut(u64) -> u64 + Send>;

/// Uniform jitter from the thread's random generator.
pub(crate) fn random_jitter() -> Jitter {
    Box::new(|ceiling| rand::rng().random_range(0..=ceiling))
}

/// How to reconnect after a lost connection. Build with struct update syntax over
/// [`Default`].
///
/// The client reconnects when the transport fails, the broker goes silent, or the broker
/// closes the session with `reconnect: true` (e.g. `shutting_down`, `token_expired`,
/// `slow_consumer`). It stops for good on a close whose `reconnect` is false (`normal`,
/// `unauthorized`, `protocol_error`, ...), on [`crate::Client::close`], when every handle is
/// dropped, or after `max_attempts` failed attempts in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Upper bound of the first attempt's random delay; doubles with each failed attempt.
    /// Default 200 ms.
    pub base_delay: Duration,
    /// Cap on the upper bound of the random delay. Default 10 s.
    pub max_delay: Duration,
    /// Give up after this many failed attempts in a row (the session then ends with the last
    /// attempt's error). Default `None`: never give up.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// The upper bound of the random delay before attempt `attempt` (from 0).
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// A delay in `[0, ceiling(attempt)]` picked by `jitter`, but at least `retry_after`.
    pub(crate) fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        jitter: &mut dyn FnMut(u64) -> u64,
    ) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_millis()).unwrap_or(u64::MAX);
        let jittered = Duration::from_millis(jitter(ceiling).min(ceiling));
        jittered.max(retry_after.unwrap_or_default())
    }
}

/// The connection task's reconnect state: failed attempts in a row, which URL is next and
/// the jitter source.
pub(crate) struct Backoff {
    urls: Vec<String>,
    /// The URL of the current (or last) connection.
    current: usize,
    /// Attempts since the last `Welcome`.
    failures: u32,
    jitter: Jitter,
}

impl std::fmt::Debug for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff")
            .field("urls", &self.urls)
            .field("current", &self.current)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Backoff {
    /// `urls` is never empty (the builder checks); `current` is the URL connected first.
    pub(crate) fn new(urls: Vec<String>, current: usize, jitter: Jitter) -> Self {
        Backoff {
            urls,
            current,
            failures: 0,
            jitter,
        }
    }

    /// The wait before attempt `attempt` under `policy`, with this backoff's jitter.
    pub(crate) fn delay(
        &mut self,
        policy: &ReconnectPolicy,
        attempt: u32,
        retry_after: Option<Duration>,
    ) -> Duration {
        policy.delay(attempt, retry_after, &mut self.jitter)
    }

    /// Moves to the next URL for a new attempt and counts it; returns the attempt's index
    /// (from 0 since the last welcomed session) and the URL.
    pub(crate) fn next_attempt(&mut self) -> (u32, String) {
        self.current = (self.current + 1) % self.urls.len();
        let attempt = self.failures;
        self.failures = self.failures.saturating_add(1);
        (attempt, self.urls[self.current].clone())
    }

    /// A session was welcomed: the next loss starts from the first attempt again.
    pub(crate) fn welcomed(&mut self) {
        self.failures = 0;
    }

    /// Attempts made since the last welcomed session.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let policy = ReconnectPolicy::default();
        let ms = |attempt| policy.ceiling(attempt).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(5), ms(6)],
            [200, 400, 800, 1600, 6400, 10_000]
        );
        assert_eq!(ms(40), 10_000, "no overflow for large attempts");
        assert_eq!(ms(u32::MAX), 10_000);
    }

    #[test]
    fn delay_is_jittered_within_the_ceiling_and_honours_retry_after() {
        let policy = ReconnectPolicy::default();
        let mut distinct = std::collections::HashSet::new();
        let mut random = random_jitter();
        for _ in 0..200 {
            let delay = policy.delay(2, None, &mut random);
            assert!(delay <= Duration::from_millis(800), "{delay:?}");
            distinct.insert(delay);
        }
        assert!(distinct.len() > 10, "full jitter spreads the delays");
        for _ in 0..50 {
            let delay = policy.delay(0, Some(Duration::from_secs(3)), &mut random);
            assert!(delay >= Duration::from_secs(3), "{delay:?}");
        }
        let zero = ReconnectPolicy {
            base_delay: Duration::ZERO,
            ..ReconnectPolicy::default()
        };
        assert_eq!(zero.delay(7, None, &mut random), Duration::ZERO);
    }

    #[test]
    fn attempts_rotate_over_the_urls_and_reset_when_welcomed() {
        let urls = vec!["a".into(), "b".into(), "c".into()];
        let mut backoff = Backoff::new(urls, 0, random_jitter());
        assert_eq!(backoff.next_attempt(), (0, "b".into()));
        assert_eq!(backoff.next_attempt(), (1, "c".into()));
        assert_eq!(backoff.next_attempt(), (2, "a".into()));
        assert_eq!(backoff.failures(), 3);
        backoff.welcomed();
        assert_eq!(backoff.failures(), 0);
        assert_eq!(backoff.next_attempt(), (0, "b".into()));
        let mut single = Backoff::new(vec!["x".into()], 0, random_jitter());
        assert_eq!(single.next_attempt(), (0, "x".into()));
        assert_eq!(single.next_attempt(), (1, "x".into()));
    }

    #[test]
    fn a_scripted_jitter_makes_the_delays_deterministic() {
        use std::sync::{Arc, Mutex};
        // The source answers half of each ceiling, and once far too much (clamped).
        let asked = Arc::new(Mutex::new(Vec::new()));
        let jitter: Jitter = Box::new({
            let asked = Arc::clone(&asked);
            move |ceiling| {
                let mut asked = asked.lock().unwrap();
                asked.push(ceiling);
                if asked.len() == 4 {
                    u64::MAX
                } else {
                    ceiling / 2
                }
            }
        });
        let policy = ReconnectPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_attempts: None,
        };
        let mut backoff = Backoff::new(vec!["a".into(), "b".into()], 0, jitter);
        let run = |backoff: &mut Backoff, retry_after: Option<Duration>| {
            let (attempt, url) = backoff.next_attempt();
            (
                url,
                backoff.delay(&policy, attempt, retry_after).as_millis(),
            )
        };
        assert_eq!(run(&mut backoff, None), ("b".into(), 50));
        assert_eq!(run(&mut backoff, None), ("a".into(), 100));
        assert_eq!(run(&mut backoff, None), ("b".into(), 200));
        assert_eq!(
            run(&mut backoff, None),
            ("a".into(), 500),
            "clamped to the cap"
        );
        // A broker's retry_after is a floor above the jitter.
        let floor = Some(Duration::from_secs(2));
        assert_eq!(run(&mut backoff, floor), ("b".into(), 2000));
        backoff.welcomed();
        assert_eq!(
            run(&mut backoff, None),
            ("a".into(), 50),
            "back to the first ceiling"
        );
        assert_eq!(*asked.lock().unwrap(), [100, 200, 400, 500, 500, 100]);
    }
}
