//! CRC32c (Castagnoli, SCTP's checksum: RFC 9260 appendix A) arithmetic for rewriting the ports
//! of an SCTP packet without reading the rest of it. A CRC is linear over GF(2): the CRC of a
//! message changed in a few bytes is the old CRC xor the (init-free) CRC of the difference, and
//! the difference's CRC is that of its changed bytes advanced over the bytes that follow them,
//! a multiplication by x^(8·following) modulo the polynomial (zlib's `crc32_combine` does the
//! same). This is exact and costs two 32-step multiplications whatever the packet length: the
//! powers come from two 256-entry tables computed at compile time (x^(8·n) is the product of
//! one entry of each), so the kernel's verifier walks no loop over the packet.
//!
//! Values are in the reflected representation every CRC32c implementation uses (x^0 is the top
//! bit); SCTP stores the final value little-endian in the common header's checksum field.
//!
//! Kept hand-written: no CRC crate offers a `no_std`, loop-free port-rewrite delta the eBPF
//! verifier accepts; whole-packet checksums (feature `user`) come from the `crc` crate.

/// The Castagnoli polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// All ones when `bit` is 1, zero when it is 0 (branch-free: every path is the same for the
/// kernel's verifier).
#[inline(always)]
const fn mask(bit: u32) -> u32 {
    0u32.wrapping_sub(bit & 1)
}

/// `value`·x mod P.
#[inline(always)]
const fn times_x(value: u32) -> u32 {
    (value >> 1) ^ (POLY & mask(value))
}

/// a(x)·b(x) mod P(x).
#[inline(always)]
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = 0;
    while bit < 32 {
        product ^= b & mask(a >> (31 - bit));
        b = times_x(b);
        bit += 1;
    }
    product
}

/// x^(8·bytes) mod P(x): what advancing a CRC over `bytes` zero bytes multiplies it by.
const fn advance_over_zeros(bytes: u16) -> u32 {
    let mut power = 1 << 31; // x^0
    let mut square = 1 << (31 - 8); // x^8, then x^16, x^32, … x^(8·2^15)
    let mut bit = 0;
    while bit < 16 {
        // Branch-free: a branch on a bit of `bytes` would split the verifier's knowledge of
        // `bytes` in two at every step (2^16 paths to verify).
        let take = mask((bytes >> bit) as u32);
        power = (multiply(square, power) & take) | (power & !take);
        square = multiply(square, square);
        bit += 1;
    }
    power
}

/// `[x^(8·stride·i) mod P for i in 0..256]`.
const fn advance_table(stride: u16) -> [u32; 256] {
    let step = advance_over_zeros(stride);
    let mut table = [0; 256];
    table[0] = 1 << 31;
    let mut i = 1;
    while i < 256 {
        table[i] = multiply(table[i - 1], step);
        i += 1;
    }
    table
}

/// Advancing over `i` zero bytes, `i < 256`.
static ADVANCE_BYTES: [u32; 256] = advance_table(1);
/// Advancing over `256·i` zero bytes.
static ADVANCE_BLOCKS: [u32; 256] = advance_table(256);

/// What to xor into the CRC32c of an SCTP packet of `sctp_len` bytes (common header included) whose first four bytes, the source and destination ports, change from
/// `old_ports` to `new_ports` (as they are in the packet).
#[inline(always)]
#[must_use]
pub fn port_rewrite_delta(old_ports: [u8; 4], new_ports: [u8; 4], sctp_len: u16) -> u32 {
    let diff = [
        old_ports[0] ^ new_ports[0],
        old_ports[1] ^ new_ports[1],
        old_ports[2] ^ new_ports[2],
        old_ports[3] ^ new_ports[3],
    ];
    // The CRC (no initial value) of the four changed bytes is their little-endian word
    // advanced over 32 bits of zeros; advanced again over the rest of the packet, that is the
    // word advanced over the whole packet's length.
    let [high, low] = sctp_len.to_be_bytes();
    let advance = multiply(
        ADVANCE_BLOCKS[usize::from(high)],
        ADVANCE_BYTES[usize::from(low)],
    );
    multiply(u32::from_le_bytes(diff), advance)
}

/// Offset of the CRC32c in the SCTP common header (after the two ports and the tag).
pub const SCTP_CHECKSUM_OFF: usize = 8;

/// The CRC32c of an SCTP packet (common header and chunks) with its checksum field taken as
/// zero, in the byte order the packet carries it.
#[cfg(feature = "user")]
#[must_use]
pub fn sctp_checksum(sctp: &[u8]) -> [u8; 4] {
    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut digest = CASTAGNOLI.digest();
    digest.update(&sctp[..SCTP_CHECKSUM_OFF]);
    digest.update(&[0; 4]);
    digest.update(&sctp[SCTP_CHECKSUM_OFF + 4..]);
    digest.finalize().to_le_bytes()
}

/// Writes the CRC32c of the SCTP packet `sctp` (at least a common header) into it.
#[cfg(feature = "user")]
pub fn set_sctp_checksum(sctp: &mut [u8]) {
    let sum = sctp_checksum(sctp);
    sctp[SCTP_CHECKSUM_OFF..SCTP_CHECKSUM_OFF + 4].copy_from_slice(&sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bitwise CRC32c, the textbook definition, to check the algebra against.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for byte in data {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = times_x(crc);
            }
        }
        !crc
    }

    #[test]
    fn the_reference_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_port_rewrite_delta_gives_the_crc_of_the_rewritten_packet() {
        for len in [12_usize, 13, 16, 17, 100, 1480, 9000, 65_515] {
            let packet: [u8; 4] = [0x9c, 0x40, 0x00, 0x50];
            let mut data: [u8; 65_535] = [0; 65_535];
            for (i, byte) in data.iter_mut().enumerate().take(len) {
                *byte = (i as u8).wrapping_mul(31) ^ 0x5a;
            }
            data[..4].copy_from_slice(&packet);
            data[8..12].copy_from_slice(&[0; 4]);
            let old = crc32c(&data[..len]);
            for new_ports in [[0x9c, 0x40, 0x1f, 0x90], [0x75, 0x30, 0x00, 0x50], [0; 4]] {
                data[..4].copy_from_slice(&new_ports);
                let want = crc32c(&data[..len]);
                let got = old ^ port_rewrite_delta(packet, new_ports, len as u16);
                assert_eq!(got, want, "len {len} ports {new_ports:?}");
            }
            data[..4].copy_from_slice(&packet);
        }
    }
}
