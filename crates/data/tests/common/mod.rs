//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// The tinyshakespeare corpus shipped in the shared data directory. Panics (failing the test)
/// if it is missing: these tests must not pass vacuously.
pub fn tinyshakespeare() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()))
            .join("../../../shared/data/tinyshakespeare.txt");
    assert!(
        path.is_file(),
        "test corpus missing: {} (expected the shared data checkout next to the repository)",
        path.display()
    );
    path
}

pub fn tinyshakespeare_text() -> String {
    std::fs::read_to_string(tinyshakespeare()).expect("tinyshakespeare is UTF-8")
}

/// Writes the first `bytes` bytes (cut at a line end) of tinyshakespeare into `dir`.
pub fn shakespeare_excerpt(dir: &Path, bytes: usize) -> PathBuf {
    let text = tinyshakespeare_text();
    let end = text[..bytes].rfind('\n').map_or(bytes, |i| i + 1);
    let path = dir.join("excerpt.txt");
    std::fs::write(&path, &text[..end]).unwrap();
    path
}

/// Writes a parquet file with one string column `column` (optional, so `None` is a null).
pub fn write_parquet(path: &Path, column: &str, values: &[Option<&str>], row_groups: usize) {
    let schema =
        parse_message_type(&format!("message schema {{ OPTIONAL BYTE_ARRAY {column} (UTF8); OPTIONAL INT64 id; }}"))
            .unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), Arc::new(schema), props).unwrap();
    let per_group = values.len().div_ceil(row_groups.max(1)).max(1);
    for (g, chunk) in values.chunks(per_group).enumerate() {
        let mut rg = writer.next_row_group().unwrap();
        let defs: Vec<i16> = chunk.iter().map(|v| i16::from(v.is_some())).collect();
        let strings: Vec<ByteArray> = chunk.iter().flatten().map(|s| ByteArray::from(*s)).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&strings, Some(&defs), None).unwrap();
        col.close().unwrap();
        let ids: Vec<i64> = (0..chunk.len() as i64).map(|i| i + (g * per_group) as i64).collect();
        let id_defs = vec![1i16; chunk.len()];
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<parquet::data_type::Int64Type>().write_batch(&ids, Some(&id_defs), None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

/// `format!("{e:#}")`: the error with its context chain.
pub fn msg(e: anyhow::Error) -> String {
    format!("{e:#}")
}
