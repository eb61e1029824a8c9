//! Mutation fuzzing of the untrusted-input parsers: safetensors headers, .npy headers and dump
//! manifests. No input may panic; every accepted tensor must lie inside the buffer; a
//! safetensors header read alone (from a stream) is judged exactly as the whole file.
//!
//! Runs RANK1FAST_FUZZ_CASES cases per parser (default 20,000, a few seconds). The full run:
//!     RANK1FAST_FUZZ_CASES=1000000 cargo test --release -p rank1fast-core --test fuzz_parsers

use std::path::Path;

use rank1fast_core::source::{
    parse_manifest, parse_npy, parse_safetensors, parse_safetensors_head, TensorInfo,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cases() -> usize {
    std::env::var("RANK1FAST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "9007199254740993",
    "1e308",
    "null",
    "[]",
    "{}",
    "\"F32\"",
    "\"BF16\"",
    "\"I64\"",
    "\"..\"",
    "\"/etc/passwd\"",
    "4294967296",
];

/// One random mutation of `seed`: flips, truncation, splices, and number/token swaps in text.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.truncate(rng.below(v.len() + 1)),
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(i..i, tok.bytes());
            }
            4 => {
                // Replace a run of digits with an interesting number.
                let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit()).collect();
                if let Some(&i) = digits.get(rng.below(digits.len())) {
                    let mut j = i;
                    while j < v.len() && v[j].is_ascii_digit() {
                        j += 1;
                    }
                    let tok = INTERESTING[rng.below(INTERESTING.len())];
                    v.splice(i..j, tok.bytes());
                }
            }
            5 if v.len() >= 8 => {
                // Corrupt the leading length field.
                let n = rng.next() % (v.len() as u64 * 2 + 16);
                v[..8].copy_from_slice(&n.to_le_bytes());
            }
            _ => {
                let i = rng.below(v.len() + 1);
                let n = rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, junk);
            }
        }
    }
    v
}

fn check_inside(infos: &[TensorInfo], len: usize) {
    for t in infos {
        assert!(
            t.offset.checked_add(t.nbytes).is_some_and(|e| e <= len),
            "{t:?} outside {len}"
        );
    }
}

fn safetensors_seed() -> Vec<u8> {
    let header = br#"{"__metadata__":{"k":"v"},"a":{"dtype":"BF16","shape":[3,4],"data_offsets":[0,24]},"position":{"dtype":"I32","shape":[3],"data_offsets":[24,36]},"b":{"dtype":"F32","shape":[2,3,1],"data_offsets":[36,60]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend(std::iter::repeat_n(7u8, 60));
    v
}

fn npy_seed() -> Vec<u8> {
    let mut h = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }".to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(&h);
    v.extend(std::iter::repeat_n(0u8, 48));
    v
}

const MANIFEST: &[u8] = br#"{"format":"rank1fast.dump","version":1,"model":{"name":"m"},"sites":{"resid_mid.3":{"module":"model.layers.3.self_attn.o_proj","dim":576,"dtype":"bfloat16"}},"shards":[{"file":"shard-00000.safetensors","tokens":100},{"file":"shard-00001.safetensors","tokens":7}],"tokens":107}"#;

#[test]
fn seeds_parse() {
    let p = Path::new("seed");
    assert_eq!(parse_safetensors(&safetensors_seed(), p).unwrap().len(), 3);
    assert_eq!(parse_npy(&npy_seed(), p).unwrap().shape, vec![3, 4]);
    assert_eq!(parse_manifest(MANIFEST, p).unwrap().shards.len(), 2);
}

#[test]
fn fuzz_safetensors_headers() {
    let seed = safetensors_seed();
    let mut rng = Rng(0x5eed_0001);
    let mut accepted = 0;
    for _ in 0..cases() {
        let input = mutate(&mut rng, &seed);
        let p = Path::new("fuzz.safetensors");
        let whole = parse_safetensors(&input, p);
        if let Ok(infos) = &whole {
            check_inside(infos, input.len());
            accepted += 1;
        }
        // The header alone (as read from a stream) must be judged exactly as the whole file.
        let head = match input.get(..8) {
            Some(b) => {
                let n = u64::from_le_bytes(b.try_into().unwrap());
                &input[..input
                    .len()
                    .min(8usize.saturating_add(n.min(1 << 40) as usize))]
            }
            None => &input[..],
        };
        let streamed = parse_safetensors_head(head, input.len() as u64, p);
        assert_eq!(
            whole.as_ref().map_err(|e| e.to_string()),
            streamed.as_ref().map_err(|e| e.to_string()),
            "{input:?}"
        );
    }
    assert!(accepted > 0, "the mutator never produced a valid file");
}

#[test]
fn fuzz_npy_headers() {
    let seed = npy_seed();
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..cases() {
        let input = mutate(&mut rng, &seed);
        if let Ok(info) = parse_npy(&input, Path::new("fuzz.npy")) {
            check_inside(std::slice::from_ref(&info), input.len());
        }
    }
}

#[test]
fn fuzz_manifests() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..cases() {
        let input = mutate(&mut rng, MANIFEST);
        if let Ok(m) = parse_manifest(&input, Path::new("manifest.json")) {
            for (file, _) in &m.shards {
                assert!(
                    !file.contains("..") || !file.split('/').any(|c| c == ".."),
                    "{file}"
                );
                assert!(!file.starts_with('/'), "{file}");
            }
        }
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(0x5eed_0004);
    for _ in 0..cases() / 4 {
        let n = rng.below(64);
        let input: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let p = Path::new("random");
        if let Ok(infos) = parse_safetensors(&input, p) {
            check_inside(&infos, input.len());
        }
        let _ = parse_npy(&input, p);
        let _ = parse_manifest(&input, p);
    }
}
