//! First start of a run: tokenizer, validation shard, data units and initial weights, from the run file.

use crate::run_file::RunFile;
use agora_data::{prepare, train_bpe, Shard, Tokenizer};
use agora_diloco::cut_units;
use agora_model::{preset, LlamaConfig};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub model_config: LlamaConfig,
    pub val: Shard,
    pub units: Vec<Shard>,
}

/// Tokenizes the corpus (training a tokenizer first if the run file names none) into `work_dir`, and cuts
/// the training tokens into units of one round of one worker's data.
pub fn prepare_data(run: &RunFile, work_dir: &Path) -> Result<Prepared> {
    let tokenizer = match (&run.data.tokenizer, run.data.vocab_size) {
        (Some(path), _) => Tokenizer::from_file(path)?,
        (None, vocab) => {
            let vocab = vocab
                .or_else(|| run.model.preset.as_deref().and_then(agora_model::config::preset_vocab_size))
                .unwrap_or(4096);
            tracing::info!(vocab, "training a BPE tokenizer on the corpus");
            train_bpe(&run.data.files, vocab)?
        }
    };
    let report = prepare(&run.data.files, &tokenizer, work_dir, run.data.val_fraction)?;
    let train = Shard::open(&report.train_path)?;
    let val = Shard::open(&report.val_path)?;
    let seq_len = run.inner.seq_len;
    if val.len() <= seq_len {
        bail!(
            "the validation split has {} tokens, fewer than one window of {}: add data or raise [data] val_fraction",
            val.len(),
            seq_len + 1
        );
    }
    let cut = cut_units(train.tokens(), seq_len, run.windows_per_unit(), run.seed);
    data_fits(cut.units.len(), cut.total_windows, run)?;
    tracing::info!(
        units = cut.units.len(),
        windows = cut.total_windows,
        unused_windows = cut.dropped_windows,
        "cut the training data into units"
    );
    let vocab = tokenizer.vocab_size();
    let units = cut
        .units
        .into_iter()
        .map(|tokens| Shard::from_tokens(tokens, tokenizer.hash(), vocab))
        .collect::<Result<Vec<_>>>()?;

    let mut model_config = match (&run.model.preset, &run.model.config, &run.model.checkpoint) {
        (Some(name), None, None) => preset(name, Some(vocab))?,
        (None, Some(path), None) => LlamaConfig::from_file(path)?,
        (None, None, Some(dir)) => LlamaConfig::from_file(&dir.join(agora_model::checkpoint::CONFIG_FILE))?,
        _ => bail!("[model]: give exactly one of preset, config or checkpoint"),
    };
    if run.model.checkpoint.is_some() && model_config.vocab_size != vocab {
        bail!(
            "[model] checkpoint: its vocab_size is {} but the tokenizer in [data] has {vocab} tokens: name the \
             tokenizer the checkpoint was trained with",
            model_config.vocab_size
        );
    }
    if model_config.vocab_size < vocab {
        bail!("model vocab_size {} is smaller than the tokenizer's {vocab}", model_config.vocab_size);
    }
    if seq_len > model_config.max_position_embeddings {
        bail!(
            "[inner] seq_len {seq_len} exceeds the model's max_position_embeddings {}",
            model_config.max_position_embeddings
        );
    }
    model_config.bos_token_id = Some(tokenizer.bos_id());
    model_config.eos_token_id = Some(tokenizer.eos_id().into());
    std::fs::write(work_dir.join("tokenizer.json"), tokenizer.to_json_string())
        .with_context(|| format!("{}: cannot write the tokenizer", work_dir.display()))?;
    Ok(Prepared { tokenizer, model_config, val, units })
}

/// The refusal of [`data_fits`]: the run's recipe asks more of the data than it has (a campaign records it
/// as a proposal's failure rather than its own).
#[derive(Debug)]
pub struct DataDoesNotFit(pub String);

impl std::fmt::Display for DataDoesNotFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataDoesNotFit {}

/// A round closes with `min_workers` contributions, each on units of its own: the longest planned round
/// must find that many distinct units in the data, or it could never close.
pub(crate) fn data_fits(units: usize, total_windows: usize, run: &RunFile) -> Result<()> {
    let longest = run.round_plan()?.lengths().into_iter().max().expect("at least one round");
    let per_worker = (longest / run.unit_steps()) as usize;
    let needed = per_worker * run.rounds.min_workers as usize;
    if units < needed {
        return Err(anyhow::Error::new(DataDoesNotFit(format!(
            "the training split has {total_windows} windows of {} tokens, {units} data units of {} windows, but \
             the longest round ({longest} steps) needs {needed} units: {per_worker} for each of [rounds] \
             min_workers = {}. Add data, or lower [inner] steps, batch_size or round_lr_power, or min_workers",
            run.inner.seq_len + 1,
            run.windows_per_unit(),
            run.rounds.min_workers
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_round_must_fit_min_workers_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("corpus.txt"), "some text\n").unwrap();
        let path = dir.path().join("run.toml");
        let text =
            "[model]\npreset = \"tiny\"\n[data]\nfiles = [\"corpus.txt\"]\n[rounds]\ncount = 20\nmin_workers = 3\n\
                    [inner]\nsteps = 20\nbatch_size = 2\n";
        std::fs::write(&path, text).unwrap();
        std::fs::write(&path, format!("{text}round_lr_power = 0.0\n")).unwrap();
        let equal = RunFile::load(&path).unwrap();
        assert!(data_fits(3, 120, &equal).is_ok(), "one unit of a round per worker");
        let err = format!("{:#}", data_fits(2, 80, &equal).unwrap_err());
        assert!(err.contains("needs 3 units") && err.contains("min_workers = 3"), "{err}");

        std::fs::write(&path, format!("{text}round_lr_power = 1.0\n")).unwrap();
        let following = RunFile::load(&path).unwrap();
        let longest = following.round_plan().unwrap().lengths().into_iter().max().unwrap();
        let needed = (longest / 4 * 3) as usize;
        assert!(longest > 20);
        assert!(data_fits(needed, needed * 8, &following).is_ok());
        assert!(data_fits(needed - 1, needed * 8, &following).is_err(), "the longest round does not fit 3 times");
    }
}
