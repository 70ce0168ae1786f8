//! The files of a fuzz corpus directory, for the stable-Rust replay tests in
//! `core/tests/` (shared, so both corpora are read the same way).

use std::path::{Path, PathBuf};

/// Every file in `directory`, sorted by name; none if it does not exist.
pub fn inputs_in(directory: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}
