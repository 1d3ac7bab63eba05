//! A server encodes lone writes' pages with `encode_page_quick` while it
//! serves swap, when an allocation may wait for memory only its own device
//! can free: the encoder must allocate nothing, whatever the page.

use vramblk_alloc_count::{armed, counted, Counting};
use vramblk_compress::{encode_page_quick, lz, Stored, PAGE};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn the_quick_encoder_allocates_nothing() {
    let mut pages = vec![[0u8; PAGE]; 4];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for b in pages[1].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for (i, b) in pages[2].iter_mut().enumerate() {
        *b = b"swap pages of a shell: "[i % 23];
    }
    let noise = pages[1];
    pages[3][..1000].copy_from_slice(&noise[..1000]);
    let mut out = [0u8; lz::MAX_COMPRESSED];
    let mut kinds = Vec::with_capacity(pages.len());
    let before = counted();
    armed(|| {
        for p in &pages {
            kinds.push(encode_page_quick(p, &mut out));
        }
    });
    assert_eq!(counted() - before, 0, "{kinds:?}");
    assert!(matches!(kinds[0], Stored::Same(0)));
    assert_eq!(kinds[1], Stored::Raw);
    assert!(matches!(kinds[2], Stored::Compressed(_)));
    assert!(matches!(kinds[3], Stored::Compressed(_)));
}
