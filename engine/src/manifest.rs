//! Integrity manifests: per-chunk SHA-256 digests of an image. The SHA-256 of the manifest file
//! itself is the image's pinned digest (`sha256:<hex>`), so pinning one string pins every byte.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;

pub const MANIFEST_FORMAT: &str = "lazy-image-manifest/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Hex SHA-256 of each chunk, in order; the last chunk may be short.
    pub chunks: Vec<String>,
}

/// Formats a digest as `sha256:<hex>`.
pub fn digest_string(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks that a user-given digest looks like `sha256:<64 hex>` and normalises it to lower case.
pub fn parse_digest(s: &str) -> Result<String> {
    let hexpart = s
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("digest {s:?} must start with \"sha256:\"")))?;
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::new(ErrorKind::InvalidInput, format!("digest {s:?} must be sha256: and 64 hex digits")));
    }
    Ok(format!("sha256:{}", hexpart.to_ascii_lowercase()))
}

impl Manifest {
    /// Builds a manifest by hashing `reader` in `chunk_size` pieces; `progress` gets bytes done.
    pub fn build(mut reader: impl Read, chunk_size: u64, mut progress: impl FnMut(u64)) -> Result<Self> {
        check_chunk_size(chunk_size)?;
        let mut buf = vec![0u8; chunk_size as usize];
        let mut chunks = Vec::new();
        let mut size = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = reader.read(&mut buf[filled..]).map_err(|e| Error::with_source(ErrorKind::CacheIo, "reading the image", e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            chunks.push(hex::encode(Sha256::digest(&buf[..filled])));
            size += filled as u64;
            progress(size);
            if filled < buf.len() {
                break;
            }
        }
        if size == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "the image is empty"));
        }
        Ok(Manifest { format: MANIFEST_FORMAT.into(), size, chunk_size, chunks })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses manifest bytes; with `pinned`, the bytes must hash to that digest first.
    pub fn parse(bytes: &[u8], pinned: Option<&str>) -> Result<Self> {
        if let Some(want) = pinned {
            let got = digest_string(bytes);
            if got != want {
                return Err(Error::new(ErrorKind::Integrity, format!("manifest digest is {got}, expected {want}")));
            }
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::with_source(ErrorKind::InvalidInput, "parsing the manifest", e))?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::new(ErrorKind::InvalidInput, format!("manifest format {:?} is not {MANIFEST_FORMAT:?}", m.format)));
        }
        check_chunk_size(m.chunk_size)?;
        if m.chunks.len() as u64 != m.size.div_ceil(m.chunk_size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("manifest lists {} chunks for {} bytes of {}-byte chunks", m.chunks.len(), m.size, m.chunk_size),
            ));
        }
        Ok(m)
    }

    pub fn digest(&self) -> String {
        digest_string(&self.to_bytes())
    }

    /// True when `data` is chunk `index`'s exact bytes.
    pub fn verify(&self, index: u64, data: &[u8]) -> bool {
        self.chunks.get(index as usize).is_some_and(|want| hex::encode(Sha256::digest(data)) == *want)
    }
}

/// Chunk sizes are powers of two between 4 KiB and 16 MiB so chunks align with device blocks.
pub fn check_chunk_size(cs: u64) -> Result<()> {
    if !(4096..=16 << 20).contains(&cs) || !cs.is_power_of_two() {
        return Err(Error::new(ErrorKind::InvalidInput, format!("chunk size {cs} must be a power of two between 4096 and 16777216")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_verify_roundtrip() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = Manifest::build(&data[..], 4096, |_| {}).unwrap();
        assert_eq!(m.chunks.len(), 3);
        let bytes = m.to_bytes();
        let pinned = digest_string(&bytes);
        let back = Manifest::parse(&bytes, Some(&pinned)).unwrap();
        assert_eq!(back, m);
        assert!(back.verify(2, &data[8192..]));
        assert!(!back.verify(2, &data[8191..]));
        let wrong = digest_string(b"other");
        assert_eq!(Manifest::parse(&bytes, Some(&wrong)).unwrap_err().kind(), ErrorKind::Integrity);
    }

    #[test]
    fn rejects_bad_digests_and_sizes() {
        assert!(parse_digest("md5:abc").is_err());
        assert!(parse_digest("sha256:xyz").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_ok());
        assert!(check_chunk_size(3000).is_err());
        assert!(check_chunk_size(65536).is_ok());
    }
}
