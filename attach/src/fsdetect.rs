//! Recognises the filesystems we mount by their superblock magic.

use crate::{AttachError, AttachErrorKind};
use lazy_image_engine::BlockView;
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

    /// Whether the filesystem can be mounted read-write (over a writable layer); erofs and
    /// squashfs are read-only formats.
    pub fn writable(self) -> bool {
        matches!(self, FsType::Ext4)
    }

    /// Mount data: ext4 must not replay a journal on a read-only device.
    pub fn mount_data(self) -> &'static str {
        match self {
            FsType::Ext4 => "noload",
            FsType::Erofs | FsType::Squashfs => "",
        }
    }

    /// The filesystem's block size from its superblock: a block device under it must not have
    /// larger logical blocks (ext4 made small by mkfs uses 1 KiB blocks).
    pub fn block_size(self, head: &[u8]) -> Option<u32> {
        match self {
            FsType::Ext4 => {
                let log = u32::from_le_bytes(head.get(1024 + 24..1024 + 28)?.try_into().ok()?);
                (log <= 6).then(|| 1024 << log)
            }
            FsType::Erofs => {
                let bits = *head.get(1024 + 12)?;
                (9..=16).contains(&bits).then(|| 1 << bits)
            }
            // squashfs addresses bytes and reads in units of at least 1 KiB of its own choosing.
            FsType::Squashfs => Some(4096),
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
pub async fn detect(image: &dyn BlockView) -> Result<FsType, AttachError> {
    let head = image.read(0, 2048).await?;
    FsType::from_superblock(&head).ok_or_else(|| {
        AttachError::new(
            AttachErrorKind::UnknownFormat,
            "the image is not an ext4, erofs or squashfs filesystem (no known superblock magic)",
        )
    })
}

/// The largest logical block size a device for this image may have: 4096 when the image is
/// whole 4 KiB blocks and so is the filesystem's block size, else 512.
pub async fn device_block_size(image: &dyn BlockView, fs: FsType) -> Result<u32, AttachError> {
    let head = image.read(0, 2048).await?;
    let fs_block = fs.block_size(&head).unwrap_or(512);
    Ok(if fs_block >= 4096 && image.size().is_multiple_of(4096) { 4096 } else { 512 })
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
        assert_eq!(FsType::Erofs.block_size(&b), None, "blkszbits 0 is not a block size");
        b[1024 + 12] = 12;
        assert_eq!(FsType::Erofs.block_size(&b), Some(4096));
        b[1024 + 24] = 0;
        assert_eq!(FsType::Ext4.block_size(&b), Some(1024));
        b[1024 + 24] = 2;
        assert_eq!(FsType::Ext4.block_size(&b), Some(4096));
        b[0..4].copy_from_slice(b"hsqs");
        assert_eq!(FsType::from_superblock(&b), Some(FsType::Squashfs));
        assert!("xfs".parse::<FsType>().is_err());
    }
}
