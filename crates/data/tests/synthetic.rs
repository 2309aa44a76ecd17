use agora_data::synthetic::{MarkovSource, NUM_WORDS};

#[test]
fn empirical_entropy_matches_analytic_rate() {
    let src = MarkovSource::new(1);
    let analytic = src.entropy_rate_bits_per_word();
    let text = src.generate(200_000, 2);
    let empirical = src.empirical_bits_per_word(&text).unwrap();
    let rel = (empirical - analytic).abs() / analytic;
    eprintln!(
        "analytic {analytic:.4} bits/word, empirical {empirical:.4} ({:.2}%), {:.3} chars/word, {:.4} nats/char",
        rel * 100.0,
        src.mean_chars_per_word(),
        src.entropy_rate_nats_per_char()
    );
    assert!(rel < 0.02, "empirical {empirical} vs analytic {analytic}");
    assert!((1.0..4.0).contains(&analytic), "a learnable but non-trivial source: {analytic}");

    // Characters per chain step measured on the sample agree with the analytic expectation.
    let steps = text.split([' ', '.', '\n']).filter(|w| !w.is_empty()).count() + text.matches(['.', '\n']).count();
    let chars_per_step = text.len() as f64 / steps as f64;
    assert!((chars_per_step / src.mean_chars_per_word() - 1.0).abs() < 0.02, "{chars_per_step}");
}

#[test]
fn generation_is_deterministic_and_well_formed() {
    let src = MarkovSource::new(5);
    assert_eq!(src.words().len(), NUM_WORDS);
    let a = src.generate(1000, 9);
    assert_eq!(a, MarkovSource::new(5).generate(1000, 9));
    assert_ne!(a, src.generate(1000, 10));
    assert_ne!(src.words(), MarkovSource::new(6).words());
    assert!(a.ends_with('\n'));
    assert!(a.is_ascii());
    assert!(a.lines().all(|l| !l.starts_with(' ') && l.ends_with('.')), "lines are sentences");

    let floor = src.loss_floor_nats_per_token(3.0);
    assert!((floor - 3.0 * src.entropy_rate_nats_per_char()).abs() < 1e-12);
    assert!(src.empirical_bits_per_word("zzzzzzzzzzq.").is_err());
}
