//! hqq's bit packing (`hqq/core/bitpack.py`), byte for byte.
//!
//! hqq quantizes a weight reshaped to a matrix of `rows x cols` codes (for axis 1: one row per
//! group; for axis 0: one column per group) and packs it along the rows: with `k` codes per
//! storage word, the matrix is cut into `k` horizontal slices of `step = rows / k` rows, and
//! packed row `r` holds the codes of rows `r, r + step, r + 2*step, ...`, the first slice in the
//! most significant bits. Layouts:
//!
//! | nbits | packing   | word  | codes per word | packed shape            |
//! |-------|-----------|-------|----------------|-------------------------|
//! | 8     | `8bit_u8` | u8    | 1              | `[rows, cols]`          |
//! | 4     | `4bit_u8` | u8    | 2              | `[rows/2, cols]`        |
//! | 3     | `3bit_32` | i32   | 10 (bits 29..0)| `[ceil(rows/10), cols]` |
//! | 2     | `2bit_u8` | u8    | 4              | `[rows/4, cols]`        |
//! | 1     | `1bit_u8` | u8    | 8              | `[rows/8, cols]`        |
//!
//! The 3-bit layout pads `rows` with zero codes up to a multiple of 10; the others need `rows`
//! to be a multiple of their codes per word (hqq fails otherwise, and so does [`Packing::packed_rows`]).

/// One of hqq's packings, chosen by `nbits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Bits per code: 1, 2, 3, 4 or 8.
    pub nbits: u32,
}

impl Packing {
    /// The packing hqq uses for `nbits`, if it has one.
    pub fn new(nbits: u32) -> Option<Packing> {
        matches!(nbits, 1 | 2 | 3 | 4 | 8).then_some(Packing { nbits })
    }

    /// hqq's name for it, stored in the checkpoint's `packing` tensor.
    pub fn name(self) -> &'static str {
        match self.nbits {
            8 => "8bit_u8",
            4 => "4bit_u8",
            3 => "3bit_32",
            2 => "2bit_u8",
            _ => "1bit_u8",
        }
    }

    /// The dtype hqq views packed words as (its `unpack_view_dtype`).
    pub fn torch_view_dtype(self) -> &'static str {
        if self.nbits == 3 {
            "torch.int32"
        } else {
            "torch.uint8"
        }
    }

    /// Codes per storage word.
    pub fn per_word(self) -> usize {
        if self.nbits == 3 {
            10
        } else {
            8 / self.nbits as usize
        }
    }

    /// Bytes per storage word (4 for the 3-bit int32 words, else 1).
    pub fn word_bytes(self) -> usize {
        if self.nbits == 3 {
            4
        } else {
            1
        }
    }

    /// Packed rows for `rows` code rows, or `None` when hqq cannot pack that many.
    pub fn packed_rows(self, rows: usize) -> Option<usize> {
        let k = self.per_word();
        if self.nbits == 3 {
            Some(rows.div_ceil(k))
        } else {
            (rows % k == 0).then_some(rows / k)
        }
    }

    /// Right shift of the code for slice `slice` (0 = most significant) inside a word.
    fn shift(self, slice: usize) -> u32 {
        (self.per_word() - 1 - slice) as u32 * self.nbits
    }

    /// Packs a row-major `rows x cols` matrix of codes into little-endian words.
    /// Panics if `rows` is not packable (see [`Packing::packed_rows`]).
    pub fn pack(self, codes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        assert_eq!(codes.len(), rows * cols);
        let step = self.packed_rows(rows).expect("row count not packable");
        let mut words = vec![0u32; step * cols];
        for r in 0..rows {
            let (slice, pr) = (r / step, r % step);
            let shift = self.shift(slice);
            let dst = &mut words[pr * cols..(pr + 1) * cols];
            for (w, &q) in dst.iter_mut().zip(&codes[r * cols..(r + 1) * cols]) {
                *w |= (q as u32) << shift;
            }
        }
        if self.nbits == 3 {
            words.iter().flat_map(|w| w.to_le_bytes()).collect()
        } else {
            words.iter().map(|&w| w as u8).collect()
        }
    }

    /// Codes `c0 .. c0 + out.len()` of unpacked row `r` (of `rows`), from packed words `cols` wide.
    pub fn unpack_at(self, packed: &[u8], rows: usize, cols: usize, r: usize, c0: usize, out: &mut [u8]) {
        let step = self.packed_rows(rows).expect("row count not packable");
        let shift = self.shift(r / step);
        let mask = (1u32 << self.nbits) - 1;
        let wb = self.word_bytes();
        let start = (r % step) * cols + c0;
        let src = &packed[start * wb..(start + out.len()) * wb];
        if wb == 1 {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = ((b as u32 >> shift) & mask) as u8;
            }
        } else {
            for (o, w) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = ((u32::from_le_bytes(w.try_into().unwrap()) >> shift) & mask) as u8;
            }
        }
    }

    /// Unpacks all `rows x cols` codes.
    pub fn unpack(self, packed: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        let mut codes = vec![0u8; rows * cols];
        for (r, row) in codes.chunks_mut(cols.max(1)).enumerate().take(rows) {
            self.unpack_at(packed, rows, cols, r, 0, row);
        }
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(rows: usize, cols: usize, nbits: u32) -> Vec<u8> {
        (0..rows * cols).map(|i| ((i * 7 + i / 3) % (1 << nbits)) as u8).collect()
    }

    #[test]
    fn round_trips_every_packing() {
        for nbits in [1, 2, 3, 4, 8] {
            let p = Packing::new(nbits).unwrap();
            for rows in [8, 16, 40, 24, 80] {
                if p.packed_rows(rows).is_none() {
                    continue;
                }
                let c = codes(rows, 5, nbits);
                let packed = p.pack(&c, rows, 5);
                assert_eq!(packed.len(), p.packed_rows(rows).unwrap() * 5 * p.word_bytes());
                assert_eq!(p.unpack(&packed, rows, 5), c, "{nbits} bits, {rows} rows");
            }
        }
    }

    #[test]
    fn four_bits_put_the_first_half_in_the_high_nibble() {
        // rows 0,1 | 2,3 of one column: packed row 0 = q0<<4 | q2, row 1 = q1<<4 | q3.
        let p = Packing::new(4).unwrap();
        assert_eq!(p.pack(&[1, 2, 3, 4], 4, 1), [0x13, 0x24]);
    }

    #[test]
    fn three_bits_pad_to_ten_slices_of_int32() {
        // 12 rows -> step 2; row r sits in word r % 2 at shift 27 - 3 * (r / 2).
        let p = Packing::new(3).unwrap();
        let c: Vec<u8> = (0..12).map(|i| (i % 8) as u8).collect();
        let packed = p.pack(&c, 12, 1);
        let w0 = u32::from_le_bytes(packed[0..4].try_into().unwrap());
        let want: u32 = [0u32, 2, 4, 6, 0, 2].iter().enumerate().map(|(s, &q)| q << (27 - 3 * s)).sum();
        assert_eq!(w0, want);
        assert_eq!(packed.len(), 2 * 4);
        assert_eq!(p.packed_rows(11), Some(2));
        assert_eq!(Packing::new(4).unwrap().packed_rows(3), None);
    }
}
