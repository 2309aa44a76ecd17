//! How the CLI writes quantities for people.

/// Bytes in decimal units: `512 B`, `48.3 kB`, `68.21 MB`, `3.41 GB`.
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.2} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

/// Micro-credits as credits: `1.500000`.
pub fn credits(micro: i64) -> String {
    format!("{:.6}", micro as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_picks_the_unit() {
        use super::human_bytes;
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(48_300), "48.3 kB");
        assert_eq!(human_bytes(68_210_000), "68.21 MB");
        assert_eq!(human_bytes(3_410_000_000), "3.41 GB");
    }

    #[test]
    fn credits_are_millionths() {
        assert_eq!(super::credits(1_500_000), "1.500000");
    }
}
