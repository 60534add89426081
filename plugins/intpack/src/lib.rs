//! The GPTQ storage layout: codes packed LSB-first into int32 words, with its tests. Shared by
//! the `gptq` plugin and the `hqq` plugin's GPTQ export, so both write the same bits.
//!
//! Every bit width uses one rule: the `k`-th value of a stream occupies bits `k*bits ..
//! (k+1)*bits` of the concatenated little-endian words. For 2, 4 and 8 bits a value never
//! crosses a word; for 3 bits, 32 values fill exactly 3 words and values 10 and 21 straddle
//! a boundary (this is AutoGPTQ's 3-bit layout).
//!
//! - `qweight` `[in*bits/32, out]`: one stream per output column, running down the input
//!   dimension (consecutive words of a stream are `out` apart).
//! - `qzeros` `[groups, out*bits/32]`: one stream per group row, running along the outputs.

/// Writes `value` (already `< 2^bits`) as the `k`-th entry of the stream whose first word is
/// `words[base]` and whose words are `stride` apart. The words must start zeroed.
pub fn put(words: &mut [u32], base: usize, stride: usize, k: usize, bits: u32, value: u32) {
    let bit = k * bits as usize;
    let (w, off) = (base + bit / 32 * stride, (bit % 32) as u32);
    words[w] |= value << off;
    if off + bits > 32 {
        words[w + stride] |= value >> (32 - off);
    }
}

/// Reads the `k`-th entry of a stream laid out as for [`put`].
pub fn get(words: &[u32], base: usize, stride: usize, k: usize, bits: u32) -> u32 {
    let bit = k * bits as usize;
    let (w, off) = (base + bit / 32 * stride, (bit % 32) as u32);
    let mut v = words[w] >> off;
    if off + bits > 32 {
        v |= words[w + stride] << (32 - off);
    }
    v & ((1u32 << bits) - 1)
}

/// Packs codes given row-major `[inp, out]` into `qweight` words `[inp*bits/32, out]`.
pub fn pack_qweight(codes: &[u8], inp: usize, out: usize, bits: u32) -> Vec<u32> {
    assert_eq!(codes.len(), inp * out);
    assert_eq!(inp * bits as usize % 32, 0, "input features must fill whole words");
    let mut words = vec![0u32; inp * bits as usize / 32 * out];
    for i in 0..inp {
        for o in 0..out {
            put(&mut words, o, out, i, bits, codes[i * out + o] as u32);
        }
    }
    words
}

/// Packs zero points given row-major `[groups, out]` into `qzeros` words
/// `[groups, out*bits/32]`, storing `zero - offset` (`offset` 1 for the v1 format, 0 for v2).
pub fn pack_qzeros(zeros: &[u8], groups: usize, out: usize, bits: u32, offset: u32) -> Vec<u32> {
    assert_eq!(zeros.len(), groups * out);
    assert_eq!(out * bits as usize % 32, 0, "output features must fill whole words");
    let row = out * bits as usize / 32;
    let mask = (1u32 << bits) - 1;
    let mut words = vec![0u32; groups * row];
    for g in 0..groups {
        for o in 0..out {
            // v1 stores zero-1; a zero of 0 would wrap, which is why quantizing for v1 keeps zeros >= 1.
            let stored = (zeros[g * out + o] as u32).wrapping_sub(offset) & mask;
            put(&mut words, g * row, 1, o, bits, stored);
        }
    }
    words
}

/// The 32 codes of inputs `32*p .. 32*p+32` of output column `o`: `bits` words of the stream.
pub fn unpack_block(qweight: &[u32], out: usize, o: usize, p: usize, bits: u32, codes: &mut [u8; 32]) {
    let base = p * bits as usize * out + o;
    for (k, c) in codes.iter_mut().enumerate() {
        *c = get(qweight, base, out, k, bits) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_words_are_lsb_first() {
        // Input rows 0..8 of one output column: codes 1..8 give 0x87654321.
        let codes: Vec<u8> = (1..=8).collect();
        assert_eq!(pack_qweight(&codes, 8, 1, 4), [0x8765_4321]);
    }

    #[test]
    fn qweight_streams_run_down_the_input_dimension() {
        // 2 outputs, 16 inputs at 2 bits: one word row; column 0 all 3s, column 1 code i%4.
        let mut codes = vec![0u8; 16 * 2];
        for i in 0..16 {
            codes[i * 2] = 3;
            codes[i * 2 + 1] = (i % 4) as u8;
        }
        assert_eq!(pack_qweight(&codes, 16, 2, 2), [0xFFFF_FFFF, 0xE4E4_E4E4]);
    }

    #[test]
    fn symmetric_four_bit_qzeros_word_is_0x77777777() {
        assert_eq!(pack_qzeros(&[8u8; 8], 1, 8, 4, 1), [0x7777_7777]);
        assert_eq!(pack_qzeros(&[8u8; 8], 1, 8, 4, 0), [0x8888_8888]);
        // 8 bits, zero 128: stored 127 per byte.
        assert_eq!(pack_qzeros(&[128u8; 4], 1, 4, 8, 1), [0x7F7F_7F7F]);
    }

    #[test]
    fn three_bit_layout_straddles_at_values_10_and_21() {
        // All codes 7 except value 10 = 0b101 and value 21 = 0b110.
        let mut codes = [7u8; 32];
        codes[10] = 0b101;
        codes[21] = 0b110;
        let w = pack_qweight(&codes, 32, 1, 3);
        // Word 0: values 0..9 (ones) at bits 0..29, then value 10's low two bits (01) at 30..31.
        assert_eq!(w[0], 0x7FFF_FFFF);
        // Word 1: bit 0 = value 10's high bit (1); values 11..20 at bits 1..30; bit 31 = value 21's low bit (0).
        assert_eq!(w[1], 0x7FFF_FFFF);
        // Word 2: value 21's high bits (11) at 0..1; values 22..31 at bits 2..31.
        assert_eq!(w[2], 0xFFFF_FFFF);
        let mut back = [0u8; 32];
        unpack_block(&w, 1, 0, 0, 3, &mut back);
        assert_eq!(back, codes);
    }

    #[test]
    fn every_width_round_trips() {
        for bits in [2u32, 3, 4, 8] {
            let (inp, out) = (96, 64);
            let codes: Vec<u8> = (0..inp * out).map(|i| ((i * 7 + i / 5) % (1 << bits)) as u8).collect();
            let words = pack_qweight(&codes, inp, out, bits);
            assert_eq!(words.len(), inp * bits as usize / 32 * out);
            for o in 0..out {
                for p in 0..inp / 32 {
                    let mut block = [0u8; 32];
                    unpack_block(&words, out, o, p, bits, &mut block);
                    for (k, &c) in block.iter().enumerate() {
                        assert_eq!(c, codes[(p * 32 + k) * out + o], "bits {bits} o {o} i {}", p * 32 + k);
                    }
                }
            }
            let zeros: Vec<u8> = (0..3 * out).map(|i| (1 + i % ((1 << bits) - 1)) as u8).collect();
            for offset in [0, 1] {
                let qz = pack_qzeros(&zeros, 3, out, bits, offset);
                let row = out * bits as usize / 32;
                for g in 0..3 {
                    for o in 0..out {
                        assert_eq!(get(&qz, g * row, 1, o, bits) + offset, zeros[g * out + o] as u32);
                    }
                }
            }
        }
    }
}
