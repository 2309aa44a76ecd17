mod common;

use agora_data::corpus::read_documents;
use common::{msg, write_parquet};

#[test]
fn txt_is_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.txt");
    std::fs::write(&path, "line one\nline two\n").unwrap();
    assert_eq!(read_documents(&path).unwrap(), vec!["line one\nline two\n"]);
}

#[test]
fn jsonl_reads_text_fields_and_skips_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.JSONL");
    std::fs::write(&path, "{\"text\": \"first\", \"id\": 1}\n\n{\"text\": \"sec\\nond\"}\r\n{\"text\": \"  \"}\n")
        .unwrap();
    assert_eq!(read_documents(&path).unwrap(), vec!["first", "sec\nond"]);
}

#[test]
fn jsonl_errors_name_file_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"text\": \"ok\"}\n{\"body\": \"x\"}\n", "bad.jsonl:2: missing field `text`"),
        ("{\"text\": 3}\n", "bad.jsonl:1: field `text` must be a string, found a number"),
        ("{\"text\": \"ok\"}\n\n{oops\n", "bad.jsonl:3: invalid JSON"),
        ("[\"text\"]\n", "bad.jsonl:1: expected a JSON object"),
    ];
    for (content, expected) in cases {
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, content).unwrap();
        let e = msg(read_documents(&path).unwrap_err());
        assert!(e.contains(expected), "expected {expected:?} in {e:?}");
    }
}

#[test]
fn parquet_reads_text_column_across_row_groups_skipping_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train-00000-of-00001.parquet");
    let values = [Some("alpha"), None, Some("beta"), Some("gamma δ"), Some(""), Some("eps")];
    write_parquet(&path, "text", &values, 2);
    assert_eq!(read_documents(&path).unwrap(), vec!["alpha", "beta", "gamma δ", "eps"]);
}

#[test]
fn parquet_without_text_column_lists_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.parquet");
    write_parquet(&path, "content", &[Some("x")], 1);
    let e = msg(read_documents(&path).unwrap_err());
    assert!(e.contains("wrong.parquet") && e.contains("no `text` column") && e.contains("content, id"), "{e}");

    let not_parquet = dir.path().join("fake.parquet");
    std::fs::write(&not_parquet, "definitely not parquet").unwrap();
    let e = msg(read_documents(&not_parquet).unwrap_err());
    assert!(e.contains("fake.parquet") && e.contains("not a readable parquet file"), "{e}");
}

#[test]
fn directory_reads_supported_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.txt"), "bee").unwrap();
    std::fs::write(dir.path().join("a.jsonl"), "{\"text\": \"ay\"}\n").unwrap();
    std::fs::write(dir.path().join("README.md"), "ignored").unwrap();
    write_parquet(&dir.path().join("c.parquet"), "text", &[Some("sea")], 1);
    std::fs::create_dir(dir.path().join("d.txt")).unwrap(); // a directory, not a file
    assert_eq!(read_documents(dir.path()).unwrap(), vec!["ay", "bee", "sea"]);
}

#[test]
fn empty_and_unknown_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, " \n\n").unwrap();
    let e = msg(read_documents(&empty).unwrap_err());
    assert_eq!(e, format!("{}: corpus is empty", empty.display()));

    let only_blank = dir.path().join("blank.jsonl");
    std::fs::write(&only_blank, "{\"text\": \"\"}\n").unwrap();
    assert!(msg(read_documents(&only_blank).unwrap_err()).ends_with("corpus is empty"));

    let unknown = dir.path().join("data.csv");
    std::fs::write(&unknown, "text\nhello\n").unwrap();
    let e = msg(read_documents(&unknown).unwrap_err());
    assert!(e.contains("data.csv") && e.contains("unsupported corpus file type") && e.contains(".parquet"), "{e}");

    let missing = dir.path().join("missing.txt");
    let e = msg(read_documents(&missing).unwrap_err());
    assert!(e.contains("missing.txt") && e.contains("cannot read corpus"), "{e}");

    let empty_dir = dir.path().join("sub");
    std::fs::create_dir(&empty_dir).unwrap();
    let e = msg(read_documents(&empty_dir).unwrap_err());
    assert!(e.contains("no corpus files"), "{e}");

    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let e = msg(read_documents(&binary).unwrap_err());
    assert!(e.contains("bin.txt") && e.contains("UTF-8"), "{e}");
}
