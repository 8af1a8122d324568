//! Exact discrete Laplace (two-sided geometric) noise for differential privacy.
//!
//! Everything here follows C. Canonne, G. Kamath and T. Steinke, *"The Discrete Gaussian for
//! Differential Privacy"*, NeurIPS 2020 (arXiv:2004.00010), referred to as CKS below:
//!
//! * [`bernoulli_exp`] is CKS Algorithm 1 (`Bernoulli(exp(-γ))` for `γ ∈ [0, 1]`) together with
//!   its extension to `γ > 1` (the product of `⌊γ⌋` draws of `Bernoulli(exp(-1))` and one draw of
//!   `Bernoulli(exp(-(γ - ⌊γ⌋)))`).
//! * [`discrete_laplace_scaled`] is CKS Algorithm 2 (discrete Laplace with scale `t/s`).
//! * [`discrete_laplace`] calibrates Algorithm 2 for a query of given L1 sensitivity and ε.
//!
//! The samplers use only integer and rational arithmetic on random words, so the output
//! distribution is exactly the stated one (given a uniform [`RandomSource`]); there is no
//! floating point anywhere in sampling, which avoids the attacks on floating-point Laplace noise
//! (Mironov, CCS 2012). Running time depends on the random draws, so the samplers are not
//! constant-time; CKS discuss this timing channel.
//!
//! Products such as `sensitivity * 1_000_000` are computed in `u128`, so no parameter in the
//! accepted range can overflow.

#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};

/// A source of uniformly random 64-bit words.
///
/// Production noise must come from a cryptographically secure generator (e.g. the operating
/// system's); the exactness of every sampler in this module assumes the words are uniform and
/// independent.
pub trait RandomSource {
    /// Returns the next uniformly random 64-bit word.
    fn next_u64(&mut self) -> u64;
}

/// A borrowed source is a source, so trait objects can be passed where `impl RandomSource` is taken.
impl<R: RandomSource + ?Sized> RandomSource for &mut R {
    fn next_u64(&mut self) -> u64 {
        (**self).next_u64()
    }
}

/// Deterministic generator for dry runs and tests: SHA-256 in counter mode over
/// `(seed, counter)`, 4 words per hash. NOT for production noise.
///
/// Block `i` is `SHA-256(seed.to_le_bytes() || i.to_le_bytes())`, read as four little-endian
/// `u64` words. The same seed always yields the same stream, which makes noisy outputs
/// reproducible; anyone who knows the seed can therefore remove the noise.
#[derive(Debug, Clone)]
pub struct SeededRandom {
    seed: u64,
    counter: u64,
    block: [u64; 4],
    used: usize,
}

impl SeededRandom {
    /// Creates a generator whose whole output stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: 0,
            block: [0; 4],
            used: 4,
        }
    }
}

impl RandomSource for SeededRandom {
    fn next_u64(&mut self) -> u64 {
        if self.used == self.block.len() {
            let mut hasher = Sha256::new();
            hasher.update(self.seed.to_le_bytes());
            hasher.update(self.counter.to_le_bytes());
            let digest = hasher.finalize();
            self.block = [0; 4];
            for (i, byte) in digest.iter().enumerate() {
                self.block[i / 8] |= u64::from(*byte) << (8 * (i % 8));
            }
            self.counter = self.counter.wrapping_add(1);
            self.used = 0;
        }
        let word = self.block[self.used];
        self.used += 1;
        word
    }
}

/// Uniform integer in `[0, n)` without modulo bias (rejection sampling). `n > 0`.
///
/// Words below `2^64 mod n` are rejected, so the accepted words form a range whose length is a
/// multiple of `n` and `word % n` is exactly uniform. Fewer than half the draws are rejected.
///
/// `n == 0` is a caller bug: it panics in debug builds and returns 0 in release builds.
pub fn uniform_below(rng: &mut impl RandomSource, n: u64) -> u64 {
    debug_assert!(n > 0, "uniform_below: n must be positive");
    let n = n.max(1);
    let reject_below = n.wrapping_neg() % n; // (2^64 - n) mod n == 2^64 mod n
    loop {
        let word = rng.next_u64();
        if word >= reject_below {
            return word % n;
        }
    }
}

/// `u128` version of [`uniform_below`]; uses one word per attempt when `n` fits in a `u64`.
fn uniform_below_u128(rng: &mut impl RandomSource, n: u128) -> u128 {
    if let Ok(small) = u64::try_from(n) {
        return u128::from(uniform_below(rng, small));
    }
    let reject_below = n.wrapping_neg() % n; // 2^128 mod n
    loop {
        let word = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        if word >= reject_below {
            return word % n;
        }
    }
}

/// Bernoulli(num/den) exactly, `0 <= num <= den`, `den > 0`.
///
/// Returns `uniform_below(den) < num`; `num == 0` and `num >= den` are decided without drawing.
pub fn bernoulli(rng: &mut impl RandomSource, num: u64, den: u64) -> bool {
    debug_assert!(
        den > 0 && num <= den,
        "bernoulli: need 0 <= num <= den, den > 0"
    );
    bernoulli_u128(rng, u128::from(num), u128::from(den))
}

fn bernoulli_u128(rng: &mut impl RandomSource, num: u128, den: u128) -> bool {
    if num == 0 {
        return false;
    }
    if num >= den {
        return true;
    }
    uniform_below_u128(rng, den) < num
}

/// Bernoulli(exp(-num/den)) exactly, for any `num >= 0`, `den > 0` (Canonne, Kamath, Steinke
/// 2020, Algorithm 1 and its extension to gamma > 1).
///
/// For `γ = num/den > 1` this draws `Bernoulli(exp(-1))` up to `⌊γ⌋` times (stopping at the first
/// failure) and then `Bernoulli(exp(-(γ - ⌊γ⌋)))`; the expected number of draws stays below
/// `1/(1 - e^-1) + 1` however large `γ` is. `den == 0` panics in debug builds and is treated as
/// 1 in release builds.
pub fn bernoulli_exp(rng: &mut impl RandomSource, num: u64, den: u64) -> bool {
    debug_assert!(den > 0, "bernoulli_exp: den must be positive");
    bernoulli_exp_u128(rng, u128::from(num), u128::from(den.max(1)))
}

fn bernoulli_exp_u128(rng: &mut impl RandomSource, num: u128, den: u128) -> bool {
    let mut whole = num / den;
    while whole > 0 {
        if !bernoulli_exp_at_most_one(rng, 1, 1) {
            return false;
        }
        whole -= 1;
    }
    bernoulli_exp_at_most_one(rng, num % den, den)
}

/// CKS Algorithm 1: Bernoulli(exp(-γ)) for `γ = num/den ∈ [0, 1]`.
///
/// Draw `A_k ~ Bernoulli(γ/k)` for `k = 1, 2, ...` until the first `A_k = 0`, and return whether
/// that `k` is odd; `P(k odd) = Σ_j (-γ)^j / j! = exp(-γ)`. `Bernoulli(γ/k)` is drawn as the
/// product of independent `Bernoulli(num/den)` and `Bernoulli(1/k)`, so `den * k` never has to
/// be formed.
fn bernoulli_exp_at_most_one(rng: &mut impl RandomSource, num: u128, den: u128) -> bool {
    let mut k: u64 = 1;
    while bernoulli_u128(rng, num, den) && bernoulli(rng, 1, k) {
        k += 1;
    }
    k % 2 == 1
}

/// Exact sample of the discrete Laplace distribution with P(Z = z) proportional to
/// exp(-|z| * den / num), i.e. scale num/den (Canonne, Kamath, Steinke 2020, Algorithm 2).
/// `num > 0`, `den > 0`.
///
/// CKS state Algorithm 2 for scale `t/s`; here `t = num`, `s = den`. A zero parameter panics in
/// debug builds and is treated as 1 in release builds. Outputs whose magnitude exceeds
/// `i64::MAX` (only plausible for scales above about `10^17`) are clamped to `±i64::MAX`.
pub fn discrete_laplace_scaled(rng: &mut impl RandomSource, num: u64, den: u64) -> i64 {
    debug_assert!(
        num > 0 && den > 0,
        "discrete_laplace_scaled: num and den must be positive"
    );
    discrete_laplace_u128(rng, u128::from(num.max(1)), u128::from(den.max(1)))
}

/// CKS Algorithm 2 with scale `t/s`, `t, s >= 1`.
///
/// `X = U + t·V` (with `U` uniform on `{0..t-1}` accepted with probability `exp(-U/t)` and `V`
/// geometric with ratio `e^-1`) has `P(X = x) ∝ exp(-x/t)`, so `Y = ⌊X/s⌋` has
/// `P(Y = y) ∝ exp(-y·s/t)`. A uniform sign is attached, rejecting "negative zero" so that 0
/// is not counted twice.
fn discrete_laplace_u128(rng: &mut impl RandomSource, t: u128, s: u128) -> i64 {
    loop {
        let u = uniform_below_u128(rng, t);
        if !bernoulli_exp_u128(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_u128(rng, 1, 1) {
            v += 1;
        }
        // t < 2^84 and P(v >= k) = e^-k, so saturation is never reached in practice.
        let x = t.saturating_mul(v).saturating_add(u);
        let y = x / s;
        let negative = bernoulli(rng, 1, 2);
        if negative && y == 0 {
            continue;
        }
        let magnitude = i64::try_from(y).unwrap_or(i64::MAX);
        return if negative { -magnitude } else { magnitude };
    }
}

/// Noise for a query of L1 sensitivity `sensitivity` under epsilon = epsilon_micro / 1e6:
/// discrete Laplace with scale sensitivity/epsilon, so P(z) ∝ exp(-|z| * epsilon / sensitivity).
///
/// Adding this noise to an integer query whose value changes by at most `sensitivity` between
/// neighbouring inputs gives `ε`-differential privacy, `ε = epsilon_micro / 10^6`.
///
/// Both `sensitivity` and `epsilon_micro` must be `> 0`. Zero noise is never returned silently:
/// a zero argument panics in debug builds (`debug_assert!`) and is treated as 1 in release
/// builds. Internally this is [`discrete_laplace_scaled`] with `num = sensitivity * 10^6` and
/// `den = epsilon_micro`, computed in `u128` so it cannot overflow.
pub fn discrete_laplace(rng: &mut impl RandomSource, sensitivity: u64, epsilon_micro: u64) -> i64 {
    debug_assert!(
        sensitivity > 0,
        "discrete_laplace: sensitivity must be positive"
    );
    debug_assert!(
        epsilon_micro > 0,
        "discrete_laplace: epsilon_micro must be positive"
    );
    let num = u128::from(sensitivity.max(1)) * 1_000_000;
    let den = u128::from(epsilon_micro.max(1));
    discrete_laplace_u128(rng, num, den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Standard normal 0.999 quantile.
    const Z_999: f64 = 3.090_232_306_167_813;

    /// 0.999 quantile of the chi-square distribution with `k` degrees of freedom, by the
    /// Wilson–Hilferty approximation: `(X/k)^(1/3)` is approximately normal with mean
    /// `1 - 2/(9k)` and variance `2/(9k)`, so `q ≈ k (1 - 2/(9k) + z·sqrt(2/(9k)))^3`. For the
    /// upper tail it slightly overestimates (22.68 vs the exact 22.458 at k = 6), with the
    /// relative error shrinking as k grows.
    fn chi2_quantile_999(k: usize) -> f64 {
        let k = k as f64;
        let c = 2.0 / (9.0 * k);
        k * (1.0 - c + Z_999 * c.sqrt()).powi(3)
    }

    /// Closed-form discrete Laplace pmf: P(z) = (1-a)/(1+a) a^|z|.
    fn pmf(a: f64, z: i64) -> f64 {
        (1.0 - a) / (1.0 + a) * a.powi(z.unsigned_abs() as i32)
    }

    #[test]
    fn uniform_below_chi_square() {
        let mut rng = SeededRandom::new(1);
        let (n, draws) = (7u64, 70_000u64);
        let mut counts = [0u64; 7];
        for _ in 0..draws {
            let x = uniform_below(&mut rng, n);
            assert!(x < n);
            counts[x as usize] += 1;
        }
        let expected = (draws / n) as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 22.458, "chi-square {chi2} for counts {counts:?}");
    }

    #[test]
    fn bernoulli_exp_frequencies() {
        let mut rng = SeededRandom::new(2);
        let draws = 200_000u32;
        for (num, den) in [(1u64, 2u64), (1, 1), (3, 1), (7, 3)] {
            let p = (-(num as f64) / den as f64).exp();
            let hits = (0..draws)
                .filter(|_| bernoulli_exp(&mut rng, num, den))
                .count();
            let freq = hits as f64 / f64::from(draws);
            let se = (p * (1.0 - p) / f64::from(draws)).sqrt();
            assert!(
                (freq - p).abs() < 5.0 * se,
                "exp(-{num}/{den}): {freq} vs {p}"
            );
        }
    }

    #[test]
    fn edge_cases() {
        let mut rng = SeededRandom::new(3);
        for _ in 0..1000 {
            assert!(!bernoulli(&mut rng, 0, 5));
            assert!(bernoulli(&mut rng, 5, 5));
            assert!(bernoulli_exp(&mut rng, 0, 9));
            assert!(!bernoulli_exp(&mut rng, 1000, 1)); // probability e^-1000
            assert_eq!(uniform_below(&mut rng, 1), 0);
        }
        // Scale 1/1000: P(Z != 0) = 2a/(1+a) with a = e^-1000.
        assert!((0..1000).all(|_| discrete_laplace_scaled(&mut rng, 1, 1000) == 0));
    }

    #[test]
    fn wilson_hilferty_is_close_to_tabulated_quantile() {
        let q = chi2_quantile_999(6);
        assert!((q - 22.458).abs() / 22.458 < 0.02, "{q}");
        let q = chi2_quantile_999(30); // tabulated: 59.703
        assert!((q - 59.703).abs() / 59.703 < 0.005, "{q}");
    }

    #[test]
    fn discrete_laplace_chi_square_mean_variance() {
        let draws = 200_000usize;
        // (sensitivity, epsilon_micro, seed); the last case has the non-integer scale 10/7.
        for (sensitivity, epsilon_micro, seed) in
            [(1u64, 500_000u64, 4u64), (2, 1_000_000, 5), (1, 700_000, 6)]
        {
            let eps = epsilon_micro as f64 / 1e6;
            let a = (-eps / sensitivity as f64).exp();
            let tail = |k: i64| a.powi(k as i32 + 1) / (1.0 + a); // P(Z > k) = P(Z < -k)
            let n = draws as f64;
            let mut k = 0i64;
            while n * pmf(a, k + 1) >= 5.0 && n * tail(k + 1) >= 5.0 {
                k += 1;
            }
            // Bin 0: z < -k; bins 1..=2k+1: z = -k..=k; bin 2k+2: z > k.
            let bins = (2 * k + 3) as usize;
            let mut counts = vec![0u64; bins];
            let mut rng = SeededRandom::new(seed);
            let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
            for _ in 0..draws {
                let z = discrete_laplace(&mut rng, sensitivity, epsilon_micro);
                sum += z as f64;
                sum_sq += (z as f64).powi(2);
                let bin = if z < -k {
                    0
                } else if z > k {
                    bins - 1
                } else {
                    (z + k + 1) as usize
                };
                counts[bin] += 1;
            }
            let mut chi2 = 0.0;
            for (bin, &count) in counts.iter().enumerate() {
                let p = if bin == 0 || bin == bins - 1 {
                    tail(k)
                } else {
                    pmf(a, bin as i64 - k - 1)
                };
                assert!(n * p >= 5.0);
                chi2 += (count as f64 - n * p).powi(2) / (n * p);
            }
            let critical = chi2_quantile_999(bins - 1);
            assert!(
                chi2 < critical,
                "eps {eps}: chi-square {chi2} >= {critical} ({bins} bins)"
            );

            let variance = 2.0 * a / (1.0 - a).powi(2);
            let mean = sum / n;
            assert!(
                mean.abs() < 5.0 * (variance / n).sqrt(),
                "eps {eps}: mean {mean}"
            );
            let sample_variance = (sum_sq - n * mean * mean) / (n - 1.0);
            let rel = (sample_variance - variance).abs() / variance;
            assert!(
                rel < 0.05,
                "eps {eps}: variance {sample_variance} vs {variance}"
            );
        }
    }

    #[test]
    fn epsilon_dp_ratio() {
        let epsilon_micro = 700_000u64;
        let eps = epsilon_micro as f64 / 1e6;
        let bound = eps.exp();
        let a = (-eps).exp(); // sensitivity 1
        let c = 10i64;
        for y in c - 300..=c + 300 {
            let (p, q) = (pmf(a, y - c), pmf(a, y - c - 1));
            assert!(p / q <= bound + 1e-12 && q / p <= bound + 1e-12, "y = {y}");
        }

        let draws = 400_000;
        let mut rng = SeededRandom::new(7);
        let (mut left, mut right) = (BTreeMap::new(), BTreeMap::new());
        for _ in 0..draws {
            *left
                .entry(c + discrete_laplace(&mut rng, 1, epsilon_micro))
                .or_insert(0u64) += 1;
            *right
                .entry(c + 1 + discrete_laplace(&mut rng, 1, epsilon_micro))
                .or_insert(0u64) += 1;
        }
        let mut checked = 0;
        for (y, &l) in &left {
            let r = right.get(y).copied().unwrap_or(0);
            if l >= 2000 && r >= 2000 {
                let ratio = l as f64 / r as f64; // equal sample sizes
                assert!(ratio.max(1.0 / ratio) <= bound * 1.1, "y = {y}: {l} vs {r}");
                checked += 1;
            }
        }
        assert!(checked >= 5, "only {checked} outputs checked");
    }

    #[test]
    fn seeded_random_deterministic_and_noise_not_constant() {
        let words = |seed| {
            let mut rng = SeededRandom::new(seed);
            (0..100).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(words(11), words(11));
        assert_ne!(words(11), words(12));
        assert!(words(11).windows(2).any(|w| w[0] != w[1]));

        let mut rng = SeededRandom::new(13);
        let samples: Vec<i64> = (0..1000)
            .map(|_| discrete_laplace(&mut rng, 1, 1_000_000))
            .collect();
        assert!(
            samples.iter().any(|&z| z != samples[0]),
            "noise is constant"
        );
    }

    #[test]
    fn large_scale_does_not_overflow() {
        let mut rng = SeededRandom::new(14);
        // Scale 10^12: E|Z| is about 10^12 with standard error 10^11 over 100 samples.
        let mean_abs = (0..100)
            .map(|_| discrete_laplace(&mut rng, 1_000_000, 1).unsigned_abs() as f64)
            .sum::<f64>()
            / 100.0;
        assert!((5e11..2e12).contains(&mean_abs), "mean |Z| = {mean_abs}");
        // num = sensitivity * 10^6 does not fit in u64: exercises the u128 path and clamping.
        for _ in 0..10 {
            let _ = discrete_laplace(&mut rng, u64::MAX, 1);
            let _ = discrete_laplace_scaled(&mut rng, u64::MAX, u64::MAX);
        }
    }
}
