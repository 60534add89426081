//! AutoAWQ's storage layouts for 4-bit codes, with their tests.
//!
//! - GEMM (`version: gemm`): `qweight` `[in, out/8]` and `qzeros` `[groups, out/8]` pack along
//!   the OUTPUT dimension with an interleave: nibble `i` (bits `4i..4i+4`) of word `c` holds
//!   column `8c + ORDER[i]`, `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`.
//! - GEMV (`version: gemv`): `qweight` `[out, in/8]` packs along the INPUT dimension, nibble
//!   `i` of word `c` holding input `8c + i`; `qzeros` `[out, width]` packs groups the same way,
//!   its width padded as AutoAWQ's `calculate_zeros_width` does (so `scales` `[out, width*8]`).

/// Column offset, inside its word, of the code in nibble `i` (GEMM layout).
pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Packs row-major `[rows, cols]` codes (each `< 16`, `cols` a multiple of 8) into
/// `[rows, cols/8]` words with the GEMM interleave.
pub fn pack_gemm(codes: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    assert_eq!(codes.len(), rows * cols);
    assert_eq!(cols % 8, 0, "AWQ GEMM packs 8 columns per word");
    let mut words = vec![0i32; rows * cols / 8];
    for (w, chunk) in words.iter_mut().zip(codes.chunks_exact(8)) {
        let mut v = 0u32;
        for (i, &col) in ORDER.iter().enumerate() {
            v |= (chunk[col] as u32 & 15) << (4 * i);
        }
        *w = v as i32;
    }
    words
}

/// The 8 codes of one GEMM word, in column order.
pub fn unpack_gemm_word(word: i32) -> [u8; 8] {
    let mut codes = [0u8; 8];
    for (i, &col) in ORDER.iter().enumerate() {
        codes[col] = ((word as u32 >> (4 * i)) & 15) as u8;
    }
    codes
}

/// The 8 codes of one GEMV word, in order.
pub fn unpack_gemv_word(word: i32) -> [u8; 8] {
    let mut codes = [0u8; 8];
    for (i, c) in codes.iter_mut().enumerate() {
        *c = ((word as u32 >> (4 * i)) & 15) as u8;
    }
    codes
}

/// Words per row of a GEMV `qzeros` for `in_features` and `group_size` (AutoAWQ's
/// `calculate_zeros_width`): whole groups rounded up to words of 8, then to a multiple of 2
/// for group 64 and of 4 for group 32.
pub fn gemv_zeros_width(in_features: usize, group_size: usize) -> usize {
    let multiple = match group_size {
        g if g >= 128 => 1,
        64 => 2,
        32 => 4,
        _ => 1,
    };
    (in_features / group_size).div_ceil(8).div_ceil(multiple) * multiple
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibble_i_holds_the_interleaved_column() {
        // Column k carries code k: nibbles hold 0,2,4,6,1,3,5,7 from the lowest up.
        let codes: Vec<u8> = (0..8).collect();
        assert_eq!(pack_gemm(&codes, 1, 8), [0x7531_6420]);
        assert_eq!(unpack_gemm_word(0x7531_6420), [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn high_codes_use_the_sign_bit() {
        let codes = [15u8; 8];
        assert_eq!(pack_gemm(&codes, 1, 8), [-1]);
        assert_eq!(unpack_gemm_word(-1), [15; 8]);
    }

    #[test]
    fn gemm_round_trips_rows_and_columns() {
        let (rows, cols) = (5, 24);
        let codes: Vec<u8> = (0..rows * cols).map(|k| ((k * 7 + k / 3) % 16) as u8).collect();
        let words = pack_gemm(&codes, rows, cols);
        assert_eq!(words.len(), rows * cols / 8);
        for r in 0..rows {
            for c in 0..cols / 8 {
                let got = unpack_gemm_word(words[r * cols / 8 + c]);
                assert_eq!(&got[..], &codes[r * cols + 8 * c..r * cols + 8 * c + 8]);
            }
        }
    }

    #[test]
    fn gemv_words_are_sequential() {
        assert_eq!(unpack_gemv_word(0x7654_3210), [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn gemv_zeros_width_matches_autoawq() {
        // 4096 inputs: 32 groups of 128 fit 4 words; 64 groups of 64 fit 8; 128 groups of 32 fit 16.
        assert_eq!(gemv_zeros_width(4096, 128), 4);
        assert_eq!(gemv_zeros_width(4096, 64), 8);
        assert_eq!(gemv_zeros_width(4096, 32), 16);
        // 576 inputs at 64: 9 groups need 2 words, already a multiple of 2.
        assert_eq!(gemv_zeros_width(576, 64), 2);
        // 1 word rounds up to 2 at group 64 and to 4 at group 32.
        assert_eq!(gemv_zeros_width(512, 64), 2);
        assert_eq!(gemv_zeros_width(512, 32), 4);
    }
}
