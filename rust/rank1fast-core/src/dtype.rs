//! Element types of activation tensors and their decoding to f32.

use half::slice::HalfFloatSliceExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Parse a safetensors dtype tag ("F32", "F16", "BF16").
    pub fn from_safetensors(tag: &str) -> Option<Self> {
        match tag {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn safetensors_tag(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The torch/numpy-style name used in manifests and reports.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "f32" | "F32" => Some(DType::F32),
            "float16" | "f16" | "F16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" | "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Decode little-endian `bytes` of `dtype` into `dst` (`dst.len() * dtype.size() == bytes.len()`).
pub fn decode_f32(dtype: DType, bytes: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(bytes.len(), dst.len() * dtype.size());
    match dtype {
        DType::F32 => {
            // SAFETY: every bit pattern is a valid f32; `align_to` only yields aligned items.
            let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
            if cfg!(target_endian = "little") && pre.is_empty() && post.is_empty() {
                dst.copy_from_slice(mid);
            } else {
                for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        DType::BF16 => {
            // SAFETY: as above, for u16.
            let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
            if cfg!(target_endian = "little") && pre.is_empty() && post.is_empty() {
                for (d, &b) in dst.iter_mut().zip(mid) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            } else {
                for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
        DType::F16 => {
            // `half` uses F16C when the CPU has it (runtime detection); a small stack buffer
            // avoids both an allocation and any alignment assumption about `bytes`.
            let mut tmp = [half::f16::ZERO; 256];
            for (d, c) in dst.chunks_mut(256).zip(bytes.chunks(512)) {
                let t = &mut tmp[..d.len()];
                for (h, b) in t.iter_mut().zip(c.chunks_exact(2)) {
                    *h = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                t.convert_to_f32_slice(d);
            }
        }
    }
}

/// Encode f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode_f32(dtype: DType, src: &[f32], out: &mut Vec<u8>) {
    out.reserve(src.len() * dtype.size());
    match dtype {
        DType::F32 => src
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => src
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => src
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_each_dtype() {
        let vals = [0.0f32, 1.0, -2.5, 1024.0, 0.125, -6.0, 1536.0];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = Vec::new();
            encode_f32(dt, &vals, &mut bytes);
            let mut back = vec![0f32; vals.len()];
            decode_f32(dt, &bytes, &mut back);
            assert_eq!(back, vals, "{dt:?}");
            assert_eq!(DType::from_name(dt.name()), Some(dt));
            assert_eq!(DType::from_safetensors(dt.safetensors_tag()), Some(dt));
        }
    }
}
