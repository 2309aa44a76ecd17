//! Corpus readers: turn files on disk into a list of documents (strings).
//!
//! Supported inputs, chosen by file extension (case-insensitive):
//! - `.txt`: the whole file is one document;
//! - `.jsonl`: one JSON object per line with a string field `text` (blank lines are skipped);
//! - `.parquet`: the Hugging Face `datasets` layout, a string column named `text` (nulls skipped);
//! - a directory: every supported file directly inside it, in file-name order (not recursive).
//!
//! Documents that are empty or whitespace-only are dropped: they carry no text to learn from.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};

/// File extensions [`read_documents`] understands.
pub const SUPPORTED_EXTENSIONS: [&str; 3] = ["txt", "jsonl", "parquet"];

/// Reads all documents from `path` (a file or a directory of files; see the module docs).
///
/// Fails if the path cannot be read, a file is malformed (the error names the file and, for
/// `.jsonl`, the line), the extension is unknown, or no non-empty document remains
/// (`"<path>: corpus is empty"`).
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let meta = fs::metadata(path).with_context(|| format!("{}: cannot read corpus", path.display()))?;
    let mut docs = Vec::new();
    if meta.is_dir() {
        let files = supported_files_in(path)?;
        if files.is_empty() {
            bail!("{}: directory contains no corpus files (supported: {})", path.display(), extension_list());
        }
        for file in &files {
            docs.extend(read_file(file)?);
        }
    } else {
        docs = read_file(path)?;
    }
    docs.retain(|d| !d.trim().is_empty());
    if docs.is_empty() {
        bail!("{}: corpus is empty", path.display());
    }
    Ok(docs)
}

/// Reads the documents of several inputs, in order (each input as in [`read_documents`]).
pub fn read_all_documents(paths: &[PathBuf]) -> Result<Vec<String>> {
    if paths.is_empty() {
        bail!("no corpus inputs given");
    }
    let mut docs = Vec::new();
    for path in paths {
        docs.extend(read_documents(path)?);
    }
    Ok(docs)
}

fn extension_list() -> String {
    SUPPORTED_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
}

fn extension_of(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

fn supported_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = fs::read_dir(dir).with_context(|| format!("{}: cannot list directory", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list directory", dir.display()))?;
        let path = entry.path();
        let supported = extension_of(&path).is_some_and(|e| SUPPORTED_EXTENSIONS.contains(&e.as_str()));
        if supported && path.is_file() {
            files.push(path);
        } else {
            tracing::debug!(path = %path.display(), "skipping non-corpus entry");
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<String>> {
    match extension_of(path).as_deref() {
        Some("txt") => {
            let text =
                fs::read_to_string(path).with_context(|| format!("{}: cannot read as UTF-8 text", path.display()))?;
            Ok(vec![text])
        }
        Some("jsonl") => read_jsonl(path),
        Some("parquet") => read_parquet(path),
        _ => bail!("{}: unsupported corpus file type (supported: {})", path.display(), extension_list()),
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut docs = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line = line.with_context(|| format!("{}:{lineno}: cannot read line", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}:{lineno}: invalid JSON", path.display()))?;
        let Some(object) = value.as_object() else {
            bail!(
                "{}:{lineno}: expected a JSON object with a string field `text`, found {}",
                path.display(),
                json_kind(&value)
            );
        };
        match object.get("text") {
            Some(serde_json::Value::String(text)) => docs.push(text.clone()),
            Some(other) => {
                bail!("{}:{lineno}: field `text` must be a string, found {}", path.display(), json_kind(other))
            }
            None => bail!("{}:{lineno}: missing field `text`", path.display()),
        }
    }
    Ok(docs)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let column = (0..schema.num_columns()).find(|&i| {
        let descr = schema.column(i);
        let parts = descr.path().parts();
        parts.len() == 1 && parts[0] == "text"
    });
    let Some(column) = column else {
        let present: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
        if present.iter().any(|name| name == "text") {
            bail!(
                "{}: parquet column `text` is nested (a list or struct); expected a plain string column",
                path.display()
            );
        }
        bail!("{}: parquet file has no `text` column (columns: {})", path.display(), present.join(", "));
    };
    let descr = schema.column(column);
    if descr.physical_type() != PhysicalType::BYTE_ARRAY {
        bail!(
            "{}: parquet column `text` must hold strings, found physical type {}",
            path.display(),
            descr.physical_type()
        );
    }

    let mut docs = Vec::new();
    for rg in 0..reader.num_row_groups() {
        let row_group =
            reader.get_row_group(rg).with_context(|| format!("{}: cannot read row group {rg}", path.display()))?;
        let num_rows = usize::try_from(row_group.metadata().num_rows()).unwrap_or(0);
        let ColumnReader::ByteArrayColumnReader(mut col) = row_group
            .get_column_reader(column)
            .with_context(|| format!("{}: cannot read column `text`", path.display()))?
        else {
            bail!("{}: parquet column `text` is not a byte array column", path.display());
        };
        let mut values: Vec<ByteArray> = Vec::with_capacity(num_rows);
        // Null entries only appear in the definition levels; `values` holds the non-null ones.
        let mut def_levels: Vec<i16> = Vec::with_capacity(num_rows);
        col.read_records(num_rows, Some(&mut def_levels), None, &mut values)
            .with_context(|| format!("{}: cannot decode column `text` in row group {rg}", path.display()))?;
        for value in values {
            let text = String::from_utf8(value.data().to_vec()).map_err(|_| {
                anyhow::anyhow!(
                    "{}: column `text` holds a value that is not valid UTF-8 (row group {rg})",
                    path.display()
                )
            })?;
            docs.push(text);
        }
    }
    Ok(docs)
}
