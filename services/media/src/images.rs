//! Images at complete: decoded under hard limits (a decompression bomb is
//! refused from its header, before pixels are allocated), turned upright,
//! re-encoded without any metadata (EXIF, GPS, XMP, comments), and given a
//! thumbnail, dimensions and a BlurHash.

use std::io::Cursor;

use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, codecs::jpeg::JpegEncoder, imageops::FilterType,
};

use crate::options::ImageOptions;

/// What the service stores and tells receivers.
#[derive(Debug)]
pub struct Processed {
    /// The image to serve as the original (its bytes without metadata); None
    /// when the upload itself is served (GIF: re-encoding would drop its
    /// animation, and the format carries no EXIF or location).
    pub original: Option<Vec<u8>>,
    pub thumbnail: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub blurhash: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the image is {width}x{height} pixels; the limit is {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("decoding the image would need more than {0} bytes of memory")]
    TooMuchMemory(u64),
    #[error("the image cannot be decoded: {0}")]
    Invalid(String),
}

fn format_of(mime: &str) -> Option<ImageFormat> {
    match mime {
        "image/jpeg" => Some(ImageFormat::Jpeg),
        "image/png" => Some(ImageFormat::Png),
        "image/gif" => Some(ImageFormat::Gif),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

fn decode_error(error: image::ImageError, options: &ImageOptions) -> Error {
    match error {
        image::ImageError::Limits(_) => Error::TooMuchMemory(options.max_decode_bytes),
        other => Error::Invalid(other.to_string()),
    }
}

/// Runs on a blocking thread: decoding is CPU-bound.
pub fn process(mime: &str, bytes: &[u8], options: &ImageOptions) -> Result<Processed, Error> {
    let format = format_of(mime).ok_or_else(|| Error::Invalid(format!("{mime} is not an image type")))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(options.max_decode_bytes);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|error| decode_error(error, options))?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > options.max_pixels {
        return Err(Error::TooManyPixels { width, height, limit: options.max_pixels });
    }
    // RGBA8 plus the decoder's own buffers: refuse before allocating.
    if u64::from(width) * u64::from(height) * 4 > options.max_decode_bytes {
        return Err(Error::TooMuchMemory(options.max_decode_bytes));
    }
    let orientation = decoder.orientation().map_err(|error| decode_error(error, options))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|error| decode_error(error, options))?;
    image.apply_orientation(orientation);

    let original = match format {
        ImageFormat::Gif => None,
        ImageFormat::Jpeg => Some(encode_jpeg(&image, options.jpeg_quality)?),
        other => {
            let mut out = Cursor::new(Vec::new());
            image.write_to(&mut out, other).map_err(|error| Error::Invalid(error.to_string()))?;
            Some(out.into_inner())
        }
    };
    // Fits in thumbnail_size x thumbnail_size; a smaller image keeps its
    // size (scaled up it would be bigger than the original and no sharper).
    let size = options.thumbnail_size;
    let thumbnail = match image.width() > size || image.height() > size {
        true => image.resize(size, size, FilterType::Triangle),
        false => image.clone(),
    };
    let rgba = thumbnail.to_rgba8();
    let blurhash = blurhash::encode(4, 3, rgba.width(), rgba.height(), rgba.as_raw())
        .map_err(|error| Error::Invalid(format!("blurhash: {error:?}")))?;
    Ok(Processed {
        original,
        thumbnail: encode_jpeg(&thumbnail, options.jpeg_quality)?,
        width: image.width(),
        height: image.height(),
        blurhash,
    })
}

fn encode_jpeg(image: &DynamicImage, quality: u8) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    // JPEG has no alpha: flatten to RGB.
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&DynamicImage::ImageRgb8(image.to_rgb8()))
        .map_err(|error| Error::Invalid(error.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
