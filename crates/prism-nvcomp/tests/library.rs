//! Loading libnvcomp on the host (no GPU needed): with it present (e.g.
//! after `cargo xtask fetch-nvcomp`), its version and the size queries that
//! need no device; without it, the typed error that says where it looked.

use prism_nvcomp::{Codec, DataType, Error, Nvcomp};

#[test]
fn load_or_explain() {
    match Nvcomp::load() {
        Ok(nv) => {
            assert_eq!(nv.version() / 1000, 6, "{nv:?}");
            for codec in Codec::ALL {
                let a = nv.decompress_alignments(codec).unwrap();
                assert!(
                    a.input.is_power_of_two() && a.output.is_power_of_two(),
                    "{codec}: {a:?}"
                );
                let max = nv
                    .max_compressed_bytes(codec, DataType::U32, 65536)
                    .unwrap();
                assert!(max >= 65536, "{codec}: {max}");
            }
        }
        Err(e @ Error::LibraryNotFound { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cargo xtask fetch-nvcomp") && msg.contains("nvidia-libnvcomp-cu13"),
                "{msg}"
            );
            assert!(msg.contains("libnvcomp.so.6 (system loader)"), "{msg}");
            eprintln!("SKIPPED load_or_explain's library half: {msg}");
        }
        Err(e) => panic!("{e}"),
    }
}
