use agora_data::sampling::{batch_offsets, batch_tokens, ensure_window_fits, eval_offsets};
use agora_data::shard::Shard;

const HASH: [u8; 32] = [3; 32];

#[test]
fn offsets_are_a_pure_function_of_the_arguments() {
    let a = batch_offsets(42, &HASH, 10, 0, 16, 64, 10_000);
    assert_eq!(a, batch_offsets(42, &HASH, 10, 0, 16, 64, 10_000));
    assert_eq!(a.len(), 16);
    assert_ne!(a, batch_offsets(42, &HASH, 11, 0, 16, 64, 10_000), "step matters");
    assert_ne!(a, batch_offsets(42, &HASH, 10, 1, 16, 64, 10_000), "micro-batch matters");
    assert_ne!(a, batch_offsets(43, &HASH, 10, 0, 16, 64, 10_000), "seed matters");
    assert_ne!(a, batch_offsets(42, &[4; 32], 10, 0, 16, 64, 10_000), "shard matters");
    // Pinned values: batches must not silently change between builds (that would break
    // resuming a run). Update only with a deliberate format change.
    assert_eq!(batch_offsets(0, &[0; 32], 0, 0, 4, 8, 100), PINNED);
}

const PINNED: [usize; 4] = [44, 60, 22, 70];

#[test]
fn offsets_cover_exactly_the_valid_range() {
    let (seq_len, n_tokens) = (5, 12); // valid starts: 0..=6
    let mut seen = [0usize; 7];
    for step in 0..2000 {
        for off in batch_offsets(1, &HASH, step, 0, 8, seq_len, n_tokens) {
            assert!(off + seq_len < n_tokens, "offset {off} out of range");
            seen[off] += 1;
        }
    }
    // 16000 draws over 7 starts: each expected ~2286; allow generous slack.
    assert!(seen.iter().all(|&c| (2000..2600).contains(&c)), "not uniform: {seen:?}");
    assert_eq!(batch_offsets(9, &HASH, 0, 0, 3, 11, 12), vec![0, 0, 0], "one valid start");
}

#[test]
#[should_panic(expected = "shard too short")]
fn too_short_shard_panics_with_message() {
    batch_offsets(0, &HASH, 0, 0, 1, 100, 100);
}

#[test]
fn window_check_is_a_user_facing_error() {
    assert!(ensure_window_fits(101, 100).is_ok());
    let e = ensure_window_fits(100, 100).unwrap_err().to_string();
    assert!(e.contains("100 tokens") && e.contains("101"), "{e}");
    assert!(ensure_window_fits(10, 0).is_err());
}

#[test]
fn batch_tokens_shifts_targets_by_one() {
    let shard = Shard::from_tokens((100..120).collect(), HASH, 1000).unwrap();
    let (inputs, targets) = batch_tokens(&shard, &[0, 5, 16], 3);
    assert_eq!(inputs, vec![100, 101, 102, 105, 106, 107, 116, 117, 118]);
    assert_eq!(targets, vec![101, 102, 103, 106, 107, 108, 117, 118, 119]);
}

#[test]
fn eval_windows_are_disjoint_and_strided() {
    // 101 tokens, seq_len 10: 10 windows whose targets cover tokens 1..=100 exactly once.
    let all = eval_offsets(101, 10, 100, 4);
    assert_eq!(all, vec![vec![0, 10, 20, 30], vec![40, 50, 60, 70], vec![80, 90]]);

    // Limited to 2 batches of 3: six windows spread over the whole shard, not its beginning.
    let some = eval_offsets(10_001, 10, 2, 3);
    let flat: Vec<usize> = some.concat();
    assert_eq!(some.len(), 2);
    assert_eq!(flat.len(), 6);
    assert!(flat.windows(2).all(|w| w[1] >= w[0] + 10), "non-overlapping: {flat:?}");
    assert!(*flat.last().unwrap() > 8000, "reaches the end of the shard: {flat:?}");
    assert!(flat.iter().all(|&o| o % 10 == 0 && o + 10 < 10_001));
    assert_eq!(some, eval_offsets(10_001, 10, 2, 3), "deterministic");
    assert!(eval_offsets(10_001, 10, 0, 3).is_empty());
}
