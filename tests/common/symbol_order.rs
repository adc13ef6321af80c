//! `link/symbol-order.txt`: the functions build.rs has the linker lay out side by side, and
//! the rustc whose names they are.

use std::collections::HashSet;

/// The file, read.
pub struct SymbolOrder {
    /// The release of rustc it was written for (its `# rustc` header line).
    pub rustc: String,
    /// The mangled names it lists.
    pub names: HashSet<String>,
}

pub fn read() -> SymbolOrder {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/link/symbol-order.txt"
    ))
    .unwrap();
    let (header, names): (Vec<&str>, Vec<&str>) = text
        .lines()
        .filter(|line| !line.is_empty())
        .partition(|line| line.starts_with('#'));
    let rustc = header
        .iter()
        .find_map(|line| line.strip_prefix("# rustc "))
        .expect("link/symbol-order.txt names the rustc it was written for");
    SymbolOrder {
        rustc: rustc.to_owned(),
        names: names.into_iter().map(str::to_owned).collect(),
    }
}
