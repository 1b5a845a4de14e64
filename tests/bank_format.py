"""The memory bank's file layout (docs/memory-bank.md), written independently of the C library: for tests
that build or damage bank files byte by byte (test_lemur_bank.py, fuzz_worker.py)."""

HEADER_BYTES = 64


def record_bytes(dim: int) -> int:
    return (40 + 4 * dim + 4 + 7) // 8 * 8


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bitwise: the checksum of the bank format, independent of the C library's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
