//! Every block type against values the `gguf` Python package produced from the same bytes
//! (fixtures written by `scripts/make-gguf-fixtures.py`).
//!
//! The comparison is bit-exact: ggml widens the f16 scales exactly and then does plain f32
//! multiplies and adds in a fixed order, which numpy and this crate both reproduce (no fused
//! multiply-add on either side).

use std::path::PathBuf;

use kvant_gguf::{dequantize, GgmlType};

fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let stem = ty.name().to_lowercase();
    let raw = std::fs::read(dir.join(format!("{stem}.bin"))).unwrap();
    let expected = std::fs::read(dir.join(format!("{stem}.f32"))).unwrap();
    let expected = expected
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (raw, expected)
}

fn check(ty: GgmlType) {
    let (raw, expected) = fixture(ty);
    assert_eq!(
        raw.len(),
        ty.byte_len(expected.len()).unwrap(),
        "{ty}: fixture sizes disagree"
    );
    let got = dequantize(ty, &raw, expected.len()).unwrap();
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g.to_bits(),
            e.to_bits(),
            "{ty}: value {i} (block {}): got {g}, expected {e}",
            i / ty.block_size()
        );
    }
}

#[test]
fn f32() {
    check(GgmlType::F32);
}

#[test]
fn f16() {
    check(GgmlType::F16);
}

#[test]
fn bf16() {
    check(GgmlType::BF16);
}

#[test]
fn q8_0() {
    check(GgmlType::Q8_0);
}

#[test]
fn q4_0() {
    check(GgmlType::Q4_0);
}

#[test]
fn q4_1() {
    check(GgmlType::Q4_1);
}

#[test]
fn q5_0() {
    check(GgmlType::Q5_0);
}

#[test]
fn q5_1() {
    check(GgmlType::Q5_1);
}

#[test]
fn q2_k() {
    check(GgmlType::Q2_K);
}

#[test]
fn q3_k() {
    check(GgmlType::Q3_K);
}

#[test]
fn q4_k() {
    check(GgmlType::Q4_K);
}

#[test]
fn q5_k() {
    check(GgmlType::Q5_K);
}

#[test]
fn q6_k() {
    check(GgmlType::Q6_K);
}

/// Splitting across threads must not change anything: many blocks, compared with one-block calls.
#[test]
fn parallel_split_matches_block_by_block() {
    for ty in GgmlType::ALL {
        let (raw, expected) = fixture(ty);
        let per_block = ty.type_size();
        let reps = 300;
        let big: Vec<u8> = raw.iter().copied().cycle().take(raw.len() * reps).collect();
        let got = dequantize(ty, &big, expected.len() * reps).unwrap();
        for (k, block) in big.chunks_exact(per_block).enumerate().step_by(97) {
            let one = dequantize(ty, block, ty.block_size()).unwrap();
            let at = k * ty.block_size();
            assert_eq!(
                got[at..at + ty.block_size()]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{ty} block {k}"
            );
        }
    }
}
