//! One bit per chunk: set when the chunk's bytes are in the cache file.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Bitmap { bits: vec![0; Self::byte_len(len)], len }
    }

    /// Rebuilds from persisted bytes; `None` if they cannot belong to a bitmap of `len` bits.
    pub fn from_bytes(bytes: Vec<u8>, len: u64) -> Option<Self> {
        (bytes.len() == Self::byte_len(len)).then_some(Bitmap { bits: bytes, len })
    }

    pub fn byte_len(len: u64) -> usize {
        len.div_ceil(8) as usize
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        }
    }

    pub fn count_ones(&self) -> u64 {
        self.bits.iter().map(|b| b.count_ones() as u64).sum()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
}

#[cfg(test)]
mod tests {
    use super::Bitmap;

    #[test]
    fn set_get_count_and_bounds() {
        let mut b = Bitmap::new(19);
        assert_eq!(b.as_bytes().len(), 3);
        b.set(0);
        b.set(18);
        b.set(19); // out of range: ignored
        assert!(b.get(0) && b.get(18) && !b.get(1) && !b.get(19));
        assert_eq!(b.count_ones(), 2);
        assert!(Bitmap::from_bytes(vec![0; 2], 19).is_none());
        assert_eq!(Bitmap::from_bytes(b.as_bytes().to_vec(), 19), Some(b));
    }
}
