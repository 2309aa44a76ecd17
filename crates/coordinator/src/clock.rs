//! Wall-clock time in unix milliseconds, as unsigned numbers, and differences that cannot overflow.
//!
//! Client-supplied timestamps are any `u64`; comparing them with ours must neither wrap nor panic.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 if the clock is before 1970, `u64::MAX` past the year 584 million).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// |now_ms − timestamp_ms|, exact for all inputs.
pub fn skew_ms(now_ms: u64, timestamp_ms: u64) -> u64 {
    now_ms.abs_diff(timestamp_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edge values of u64 and neighbours of a realistic now and of the signature window.
    fn edge_cases() -> Vec<u64> {
        let now = now_ms();
        let window = crate::http::MAX_SKEW_MS.unsigned_abs();
        let mut v = vec![0, 1, 2, u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) - 1, (1 << 63) + 1, i64::MAX as u64];
        for base in [now, window] {
            for d in [0, 1, window - 1, window, window + 1] {
                v.push(base.wrapping_add(d));
                v.push(base.wrapping_sub(d));
            }
        }
        v
    }

    #[test]
    fn skew_is_the_exact_absolute_difference() {
        let cases = edge_cases();
        for &a in &cases {
            for &b in &cases {
                let exact = (i128::from(a) - i128::from(b)).unsigned_abs();
                assert_eq!(u128::from(skew_ms(a, b)), exact, "|{a} - {b}|");
                assert_eq!(skew_ms(a, b), skew_ms(b, a), "symmetric for {a}, {b}");
            }
        }
        assert_eq!(skew_ms(0, u64::MAX), u64::MAX);
        assert_eq!(skew_ms(1 << 63, 0), 1 << 63);
    }

    #[test]
    fn now_agrees_with_the_signed_clock() {
        let a = now_ms();
        assert!(a > 1_577_836_800_000, "{a} is before 2020");
        let b = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert!(u128::from(a) <= b && b - u128::from(a) < 1000, "{a} vs {b}");
    }
}
