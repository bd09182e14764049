//! `cnikit-fuzz TARGET [FILE...]`: one entry point for every fuzz target.
//!
//! Built by `cargo afl build` (`--cfg fuzzing`), it is the program AFL++ runs: `afl-fuzz …
//! -- cnikit-fuzz TARGET` (see `scripts/fuzz.sh`). Built plainly, it runs TARGET once on each
//! FILE (or on stdin), to reproduce a crash under a debugger.

use std::io::Read;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(run) = cnikit_fuzz::target(&name) else {
        let names: Vec<&str> = cnikit_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "usage: cnikit-fuzz TARGET [FILE...]; targets: {}",
            names.join(" ")
        );
        std::process::exit(2);
    };
    #[cfg(fuzzing)]
    afl::fuzz!(|data: &[u8]| run(data));
    #[cfg(not(fuzzing))]
    {
        let files: Vec<String> = std::env::args().skip(2).collect();
        if files.is_empty() {
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .expect("stdin is readable");
            run(&data);
        }
        for file in files {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
            run(&data);
        }
    }
}
