//! Recognises the filesystems we mount by their superblock magic.

use crate::{AttachError, AttachErrorKind};
use lazy_image_engine::LazyImage;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Erofs,
    Squashfs,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
            FsType::Squashfs => "squashfs",
        }
    }

    /// Mount data: ext4 must not replay a journal on a read-only device.
    pub fn mount_data(self) -> &'static str {
        match self {
            FsType::Ext4 => "noload",
            FsType::Erofs | FsType::Squashfs => "",
        }
    }

    /// Identifies a filesystem from the first 2 KiB of an image.
    pub fn from_superblock(head: &[u8]) -> Option<Self> {
        let le16 = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let le32 = |o: usize| head.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if le32(0) == Some(0x7371_7368) {
            return Some(FsType::Squashfs); // "hsqs"
        }
        if le32(1024) == Some(0xE0F5_E1E2) {
            return Some(FsType::Erofs);
        }
        if le16(1024 + 56) == Some(0xEF53) {
            return Some(FsType::Ext4); // ext2/3/4 superblock magic; the ext4 driver mounts all three
        }
        None
    }
}

impl FromStr for FsType {
    type Err = AttachError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" | "ext3" | "ext2" => Ok(FsType::Ext4),
            "erofs" => Ok(FsType::Erofs),
            "squashfs" => Ok(FsType::Squashfs),
            other => Err(AttachError::new(
                AttachErrorKind::UnknownFormat,
                format!("unknown filesystem format {other:?}: expected auto, ext4, erofs or squashfs"),
            )),
        }
    }
}

/// Reads the superblock area through the engine (a few KiB from the origin) and names the type.
pub async fn detect(image: &LazyImage) -> Result<FsType, AttachError> {
    let head = image.read(0, 2048).await?;
    FsType::from_superblock(&head).ok_or_else(|| {
        AttachError::new(AttachErrorKind::UnknownFormat, "the image is not an ext4, erofs or squashfs filesystem (no known superblock magic)")
    })
}

#[cfg(test)]
mod tests {
    use super::FsType;

    #[test]
    fn magics() {
        let mut b = vec![0u8; 2048];
        assert_eq!(FsType::from_superblock(&b), None);
        b[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(FsType::from_superblock(&b), Some(FsType::Ext4));
        b[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        assert_eq!(FsType::from_superblock(&b), Some(FsType::Erofs));
        b[0..4].copy_from_slice(b"hsqs");
        assert_eq!(FsType::from_superblock(&b), Some(FsType::Squashfs));
        assert!("xfs".parse::<FsType>().is_err());
    }
}
