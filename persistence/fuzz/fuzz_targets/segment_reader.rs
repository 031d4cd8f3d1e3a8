//! Arbitrary bytes as a segment file: the reader must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kvindex_persistence::fuzzing::read_segment_bytes(data);
});
