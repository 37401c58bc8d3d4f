package rootfs

import (
	"encoding/binary"
	"fmt"
	"os"
)

// padInodeBitmaps sets the bits past the last inode of each group's inode
// bitmap, as mke2fs does. tar2ext4 leaves them clear, which e2fsck reports
// as an error ("Padding at end of inode bitmap is not set") although the
// kernel ignores them.
func padInodeBitmaps(f *os.File) error {
	var sb [1024]byte
	if _, err := f.ReadAt(sb[:], 1024); err != nil {
		return fmt.Errorf("read superblock: %w", err)
	}
	if binary.LittleEndian.Uint16(sb[0x38:]) != 0xef53 {
		return fmt.Errorf("read superblock: not an ext4 file system")
	}
	inodes := binary.LittleEndian.Uint32(sb[0x00:])
	perGroup := binary.LittleEndian.Uint32(sb[0x28:])
	blockSize := int64(1024) << binary.LittleEndian.Uint32(sb[0x18:])
	if perGroup == 0 || perGroup%8 != 0 || int64(perGroup) > blockSize*8 {
		return fmt.Errorf("read superblock: unexpected %d inodes per group", perGroup)
	}
	groups := inodes / perGroup
	descs := make([]byte, int64(groups)*32)
	if _, err := f.ReadAt(descs, blockSize); err != nil {
		return fmt.Errorf("read group descriptors: %w", err)
	}
	bitmap := make([]byte, blockSize)
	for g := range groups {
		at := int64(binary.LittleEndian.Uint32(descs[g*32+4:])) * blockSize
		if _, err := f.ReadAt(bitmap, at); err != nil {
			return fmt.Errorf("read inode bitmap of group %d: %w", g, err)
		}
		for i := perGroup / 8; i < uint32(blockSize); i++ {
			bitmap[i] = 0xff
		}
		if _, err := f.WriteAt(bitmap, at); err != nil {
			return fmt.Errorf("write inode bitmap of group %d: %w", g, err)
		}
	}
	return nil
}
