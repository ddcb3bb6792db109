use std::io::Cursor;

use messenger_testkit::media::{jpeg_with_gps, png_bomb};

use super::*;

fn options() -> ImageOptions {
    ImageOptions { max_decode_bytes: 64 * 1024 * 1024, ..ImageOptions::default() }
}

fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn stored_original_has_no_exif_or_gps() {
    let upload = jpeg_with_gps(640, 480);
    let fields = exif::Reader::new().read_from_container(&mut Cursor::new(&upload)).expect("the upload carries EXIF");
    assert!(fields.get_field(exif::Tag::GPSLatitudeRef, exif::In::PRIMARY).is_some(), "the upload carries GPS");

    let processed = process("image/jpeg", &upload, &options()).unwrap();
    let original = processed.original.expect("a JPEG is re-encoded");
    assert!(exif::Reader::new().read_from_container(&mut Cursor::new(&original)).is_err(), "no EXIF left");
    assert!(!original.windows(4).any(|window| window == b"Exif"));
    assert_eq!((processed.width, processed.height), (640, 480));
    let thumbnail = image::load_from_memory(&processed.thumbnail).unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (320, 240));
    assert_eq!(processed.blurhash.len(), 2 + 4 + 2 * 4 * 3 - 2, "4x3 components: {}", processed.blurhash);
}

#[test]
fn decompression_bomb_is_refused_from_its_header() {
    let bomb = png_bomb(20_000);
    assert!(bomb.len() < 1024 * 1024, "{} bytes on disk", bomb.len());
    let before = peak_resident_bytes();
    let error = process("image/png", &bomb, &options()).unwrap_err();
    assert_eq!(error, Error::TooManyPixels { width: 20_000, height: 20_000, limit: 50_000_000 });
    // Within the pixel limit but above the memory limit: refused too.
    let generous = ImageOptions { max_pixels: u64::MAX, ..options() };
    assert_eq!(process("image/png", &bomb, &generous).unwrap_err(), Error::TooMuchMemory(64 * 1024 * 1024));
    let grown = peak_resident_bytes().saturating_sub(before);
    assert!(grown < options().max_decode_bytes, "peak memory grew by {grown} bytes");
}

#[test]
fn gif_is_served_as_uploaded_with_a_thumbnail() {
    let frame = image::RgbaImage::from_pixel(64, 32, image::Rgba([10, 200, 30, 255]));
    let mut gif = Vec::new();
    DynamicImage::ImageRgba8(frame).write_to(&mut Cursor::new(&mut gif), ImageFormat::Gif).unwrap();
    let processed = process("image/gif", &gif, &options()).unwrap();
    assert!(processed.original.is_none());
    assert_eq!((processed.width, processed.height), (64, 32));
    // Smaller than a thumbnail: kept at its size, not scaled up.
    let thumbnail = image::load_from_memory(&processed.thumbnail).unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (64, 32));
}

#[test]
fn garbage_is_an_invalid_image() {
    assert!(matches!(process("image/png", b"\x89PNG\r\n\x1a\nnot really", &options()), Err(Error::Invalid(_))));
}
