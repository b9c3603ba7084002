//! Repeatable randomness and latency figures for the load and fault tests.

use std::io::Write;
use std::time::Duration;

/// A small seeded PRNG (SplitMix64) so fault and load tests are repeatable:
/// the seed is printed, and `NATMAP_TEST_SEED=N` replays a run.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// Seeded from `NATMAP_TEST_SEED` if set, else from the clock; prints the
    /// seed (uncaptured) with `what`.
    pub fn from_env(what: &str) -> TestRng {
        let seed = std::env::var("NATMAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let _ = writeln!(
            std::io::stderr(),
            "{what}: seed {seed} (replay with NATMAP_TEST_SEED={seed})"
        );
        TestRng(seed)
    }

    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// A random element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A generator derived from this one (for a thread).
    pub fn fork(&mut self) -> TestRng {
        TestRng(self.next_u64())
    }
}

/// Percentile `p` (0–100) of sorted `values` (nearest rank); zero if empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
