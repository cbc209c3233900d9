//! Replays every committed fuzz input through its target, without
//! cargo-fuzz or libFuzzer: the seed corpora (`fuzz/corpus/<target>/`) and
//! the inputs of every crash found so far (`fuzz/regressions/<target>/`).
//! A regression input that panics again fails the suite, naming the file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_fuzz_targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("listing a corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The names of the entries of `dir` (without `strip`), none when it does
/// not exist.
fn names(dir: &Path, strip: Option<&str>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| {
            let name = e
                .expect("listing")
                .file_name()
                .to_string_lossy()
                .into_owned();
            match strip {
                Some(suffix) => name.strip_suffix(suffix).unwrap_or(&name).to_owned(),
                None => name,
            }
        })
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn every_committed_input_runs_through_its_target_without_a_panic() {
    let fuzz = fuzz_dir();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, target) in TARGETS {
        let corpus = files(&fuzz.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ has no seed input");
        let regressions = files(&fuzz.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
        println!(
            "{name}: {} seed and {} regression inputs",
            corpus.len(),
            regressions.len()
        );
        total += corpus.len() + regressions.len();
    }
    println!(
        "replayed {total} inputs of {} targets in {:.1} s",
        TARGETS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "these inputs panic (each message above names the broken rule):\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_fuzz_binaries_corpora_and_functions_match() {
    let fuzz = fuzz_dir();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    listed.sort();
    assert_eq!(
        names(&fuzz.join("libfuzzer").join("fuzz_targets"), Some(".rs")),
        listed,
        "fuzz/libfuzzer/fuzz_targets/*.rs and TARGETS differ"
    );
    assert_eq!(
        names(&fuzz.join("corpus"), None),
        listed,
        "fuzz/corpus/ and TARGETS differ"
    );
    for name in names(&fuzz.join("regressions"), None) {
        assert!(
            listed.contains(&name),
            "fuzz/regressions/{name} is no target"
        );
    }
    let manifest = std::fs::read_to_string(fuzz.join("libfuzzer").join("Cargo.toml"))
        .expect("fuzz/libfuzzer/Cargo.toml");
    for name in &listed {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/libfuzzer/Cargo.toml has no [[bin]] {name}"
        );
    }
}
