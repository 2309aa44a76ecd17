//! The run file's tests: validation, token budgets, round plans and the run id.

use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    std::fs::write(dir.join("corpus.txt"), "some text\n").unwrap();
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_readme_diloco_run_file_is_valid() {
    let readme = include_str!("../../../README.md");
    let block = readme
        .split("```toml\n")
        .skip(1)
        .map(|b| &b[..b.find("```").expect("closed code block")])
        .find(|b| b.contains("[rounds]"))
        .expect("README has a DiLoCo run file");
    let dir = tempfile::tempdir().unwrap();
    let run = RunFile::load(&write(dir.path(), block)).unwrap();
    assert_eq!(run.inner.steps, 50);
    assert_eq!(run.outer, OuterConfig::default());
    assert_eq!(run.inner, InnerSection { warmup_steps: 100, seq_len: 128, ..InnerSection::default() }, "the defaults");
    assert_eq!(run.rounds.count, Some(40));
    assert_eq!(run.train_config().steps, 40 * 50, "the schedule spans every inner step of the run");
    assert_eq!(run.data.files, vec![std::fs::canonicalize(dir.path().join("corpus.txt")).unwrap()]);
    assert_eq!(run.run_id().unwrap(), run.run_id().unwrap());
}

#[test]
fn invalid_run_files_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\nvocab_size = 300\n[rounds]\ncount = 3\n";
    assert!(RunFile::load(&write(dir.path(), base)).is_ok());
    let cases = [
        (base.replace("preset = \"tiny\"", "preset = \"huge\""), "huge"),
        (base.replace("corpus.txt", "missing.txt"), "does not exist"),
        (base.replace("count = 3", "count = 0"), "count must be positive"),
        (base.replace("count = 3", "count = 3\ntokens = 100"), "exactly one of count"),
        (base.replace("count = 3", "min_workers = 1"), "exactly one of count"),
        (format!("{base}min_workers = 0\n"), "min_workers"),
        (format!("{base}[outer]\nmomentum = 1.5\n"), "outer.momentum"),
        (format!("{base}[outer]\nkind = \"adam\"\n"), "unknown variant"),
        (format!("{base}[inner]\nsteps = 0\n"), "[inner]"),
        (format!("{base}[inner]\nlr = -1.0\n"), "lr must be positive"),
        (format!("{base}surprise = 1\n"), "unknown field"),
        (base.replace("vocab_size = 300", "vocab_size = 10"), "at least 260"),
    ];
    for (text, expected) in cases {
        let err = format!("{:#}", RunFile::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
}

#[test]
fn a_token_budget_plans_rounds_and_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[inner]\nsteps = 10\nbatch_size = 4\nseq_len = 32\n[rounds]\ntokens = 25600\nmin_workers = 2\n";
    let run = RunFile::load(&write(dir.path(), text)).unwrap();
    assert_eq!(run.tokens_per_round(), 10 * 4 * 32);
    assert_eq!(run.planned_rounds(), 10, "25600 tokens at 2 contributions of 1280 tokens per round");
    assert_eq!(run.train_config().steps, 100);
    assert!(!run.is_finished(5, 19 * 1280));
    assert!(run.is_finished(5, 20 * 1280), "the budget counts applied tokens, however many rounds they took");
}

#[test]
fn the_run_id_changes_with_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n";
    let a = RunFile::load(&write(dir.path(), base)).unwrap().run_id().unwrap();
    let b = RunFile::load(&write(dir.path(), &base.replace("count = 3", "count = 4"))).unwrap().run_id().unwrap();
    assert_ne!(a, b);
}

/// A run that starts from a checkpoint: it must name the checkpoint's tokenizer, momentum only comes
/// with a checkpoint, and the run id covers the checkpoint's weights and the momentum file.
#[test]
fn a_checkpoint_start_is_validated_and_hashed_into_the_run_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = agora_model::preset("tiny", Some(300)).unwrap();
    let ckpt = dir.path().join("ckpt");
    agora_model::save_pretrained(&agora_model::Llama::new(&config, tch::Device::Cpu, 0), &ckpt).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    std::fs::write(dir.path().join("momentum.safetensors"), "m1").unwrap();
    let base = "[model]\ncheckpoint = \"ckpt\"\n[data]\nfiles = [\"corpus.txt\"]\ntokenizer = \"tokenizer.json\"\n[rounds]\ncount = 3\n";
    let run = RunFile::load(&write(dir.path(), base)).unwrap();
    assert_eq!(run.model.checkpoint, Some(std::fs::canonicalize(&ckpt).unwrap()), "resolved beside the file");
    let a = run.run_id().unwrap();
    let with_momentum = base.replace("ckpt\"\n", "ckpt\"\nouter_momentum = \"momentum.safetensors\"\n");
    let momentum_run = RunFile::load(&write(dir.path(), &with_momentum)).unwrap();
    let b = momentum_run.run_id().unwrap();
    assert_ne!(a, b, "the momentum is part of the run");
    std::fs::write(dir.path().join("momentum.safetensors"), "m2").unwrap();
    assert_ne!(momentum_run.run_id().unwrap(), b, "and so are its contents");
    // Other weights in the same directory: another run.
    agora_model::save_pretrained(&agora_model::Llama::new(&config, tch::Device::Cpu, 1), &ckpt).unwrap();
    assert_ne!(run.run_id().unwrap(), a, "the checkpoint's weights are part of the run");

    let cases = [
        (base.replace("tokenizer = \"tokenizer.json\"", "vocab_size = 300"), "name its tokenizer"),
        (base.replace("checkpoint = \"ckpt\"", "checkpoint = \"nowhere\""), "not a checkpoint directory"),
        (base.replace("checkpoint = \"ckpt\"", "checkpoint = \"ckpt\"\npreset = \"tiny\""), "exactly one of"),
        (
            base.replace("checkpoint = \"ckpt\"", "preset = \"tiny\"\nouter_momentum = \"momentum.safetensors\""),
            "only a run that starts from a checkpoint",
        ),
        (with_momentum.replace("momentum.safetensors", "missing.safetensors"), "does not exist"),
    ];
    for (text, expected) in cases {
        let err = format!("{:#}", RunFile::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
}

/// An earlier run pinned by its id is the same earlier run however its store is reached (a moved file,
/// a rotated password): its URL is not part of the run id then; unpinned, it is.
#[test]
fn a_pinned_previous_run_is_identified_by_its_id_not_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n[admission]\n";
    let id =
        |admission: &str| RunFile::load(&write(dir.path(), &format!("{base}{admission}"))).unwrap().run_id().unwrap();
    let pinned = |url: &str, run: &str| id(&format!("previous = \"{url}\"\nprevious_run = \"{run}\"\n"));
    assert_eq!(pinned("postgres://u:old@h/db", "abc"), pinned("postgres://u:new@h/db", "abc"));
    assert_ne!(pinned("postgres://u:old@h/db", "abc"), pinned("postgres://u:old@h/db", "abd"));
    assert_ne!(id("previous = \"sqlite:///a.db\"\n"), id("previous = \"sqlite:///b.db\"\n"));
}

/// A changed byte of the corpus (same size, same path, same run file) is a different run.
#[test]
fn the_run_id_hashes_the_corpus_contents_not_their_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 3\n";
    let run = RunFile::load(&write(dir.path(), base)).unwrap();
    let a = run.run_id().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "some test\n").unwrap();
    let b = run.run_id().unwrap();
    assert_ne!(a, b, "one byte of the corpus changed, its size did not");
    std::fs::write(&corpus, "some text\n").unwrap();
    assert_eq!(run.run_id().unwrap(), a, "the same contents are the same run");

    // A corpus directory: a byte of a file inside it.
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    std::fs::write(dir.path().join("shards/a.txt"), "alpha\n").unwrap();
    std::fs::write(dir.path().join("shards/b.jsonl"), "{\"text\": \"beta\"}\n").unwrap();
    let run = RunFile::load(&write(dir.path(), &base.replace("corpus.txt", "shards"))).unwrap();
    let c = run.run_id().unwrap();
    std::fs::write(dir.path().join("shards/b.jsonl"), "{\"text\": \"beto\"}\n").unwrap();
    assert_ne!(run.run_id().unwrap(), c);

    // A tokenizer file, likewise.
    std::fs::write(dir.path().join("tokenizer.json"), "{\"v\": 1}").unwrap();
    let with_tokenizer =
        base.replace("files = [\"corpus.txt\"]", "files = [\"corpus.txt\"]\ntokenizer = \"tokenizer.json\"");
    let run = RunFile::load(&write(dir.path(), &with_tokenizer)).unwrap();
    let d = run.run_id().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"v\": 2}").unwrap();
    assert_ne!(run.run_id().unwrap(), d);

    // A file that cannot be read is an error that names it.
    std::fs::remove_file(&corpus).unwrap();
    let err = format!("{:#}", run.run_id().unwrap_err());
    assert!(err.contains("corpus.txt"), "{err}");
}

/// Rounds whose lengths follow the rate: the plan keeps the run's rounds and steps in whole data units;
/// a unit that does not divide H, a negative power, and an overlap as long as the shortest round are
/// refused; equal rounds keep one unit per round.
#[test]
fn round_lengths_follow_the_rate_in_whole_units() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 20\n[inner]\nsteps = 20\n";
    let equal = RunFile::load(&write(dir.path(), &format!("{base}round_lr_power = 0.0\n"))).unwrap();
    assert_eq!((equal.unit_steps(), equal.windows_per_unit()), (20, 20 * 16));
    assert_eq!(equal.round_plan().unwrap().lengths(), vec![20; 20]);

    let following = RunFile::load(&write(dir.path(), &format!("{base}round_lr_power = 1.0\n"))).unwrap();
    assert_eq!(following.unit_steps(), 4, "the largest divisor of 20 up to a fifth of it");
    let plan = following.round_plan().unwrap();
    let lengths = plan.lengths();
    assert_eq!((lengths.len(), lengths.iter().sum::<u64>()), (20, 400));
    assert!(lengths.iter().all(|l| l % 4 == 0), "{lengths:?}");
    assert!(lengths[1] < 20 && lengths[19] > 20, "short while the rate is high: {lengths:?}");
    assert_eq!(following.train_config().steps, 400, "the schedule still spans the run's steps");
    assert_ne!(following.run_id().unwrap(), equal.run_id().unwrap());

    let explicit = RunFile::load(&write(dir.path(), &format!("{base}round_lr_power = 1.0\nunit_steps = 2\n"))).unwrap();
    assert!(explicit.round_plan().unwrap().lengths().iter().all(|l| l % 2 == 0));

    let cases = [
        (format!("{base}unit_steps = 3\n"), "unit_steps must divide steps"),
        (format!("{base}unit_steps = 0\n"), "unit_steps must divide steps"),
        (format!("{base}round_lr_power = -1.0\n"), "round_lr_power must be a number"),
        (format!("{base}round_lr_power = 1.0\n[compression]\noverlap_steps = {}\n", plan.shortest()), "shortest round"),
    ];
    for (text, expected) in cases {
        let err = format!("{:#}", RunFile::load(&write(dir.path(), &text)).unwrap_err());
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
    let ok = format!("{base}round_lr_power = 1.0\n[compression]\noverlap_steps = {}\n", plan.shortest() - 1);
    RunFile::load(&write(dir.path(), &ok)).unwrap();
}

/// A round longer than H gets its share more of the deadline, a shorter one keeps all of it; and a run
/// file at equal rounds keeps the run id it had before `round_lr_power` existed (left out at 0).
#[test]
fn long_rounds_get_a_longer_deadline_and_old_run_ids_stand() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 20\ndeadline_secs = 100\n\
                [inner]\nsteps = 20\n";
    let run = RunFile::load(&write(dir.path(), base)).unwrap();
    assert_eq!(
        (run.deadline_secs(20), run.deadline_secs(4), run.deadline_secs(56), run.deadline_secs(21)),
        (100, 100, 280, 105)
    );
    let canonical = serde_json::to_string(&run).unwrap();
    assert!(!canonical.contains("round_lr_power") && !canonical.contains("unit_steps"), "{canonical}");
    let explicit = RunFile::load(&write(dir.path(), &format!("{base}round_lr_power = 0.0\n"))).unwrap();
    assert_eq!(explicit.run_id().unwrap(), run.run_id().unwrap(), "0 is the default, the same run");
}
