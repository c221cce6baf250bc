mod fdct;
mod ycbcr;

use crate::encoder::Operations;
pub use fdct::fdct_avx2;
pub(crate) use ycbcr::*;

pub(crate) struct AVX2Operations;

impl Operations for AVX2Operations {
    #[inline(always)]
    fn fdct(data: &mut [i16; 64]) {
        fdct_avx2(data);
    }

    #[inline(always)]
    fn quantize_block(
        block: &[i16; 64],
        q_block: &mut [i16; 64],
        table: &crate::quantization::QuantizationTable,
    ) {
        #[target_feature(enable = "avx2")]
        unsafe fn q_avx2(
            block: &[i16; 64],
            q_block: &mut [i16; 64],
            table: &crate::quantization::QuantizationTable,
        ) {
            crate::encoder::quantize_block_generic(block, q_block, table);
        }
        unsafe { q_avx2(block, q_block, table) }
    }
}
