//! What the bytes really are: the declared MIME type checked against the
//! file's magic bytes (`infer`), so an HTML page declared as a PNG never
//! becomes "a photo".

/// Bytes read from the start of an object to recognise its type.
pub const SNIFF_BYTES: u64 = 8192;

/// Types `infer` names differently from what clients declare.
fn same_type(declared: &str, detected: &str) -> bool {
    fn canonical(mime: &str) -> &str {
        match mime {
            "image/jpg" => "image/jpeg",
            "audio/m4a" | "audio/x-m4a" => "audio/mp4",
            "video/x-m4v" => "video/mp4",
            "application/x-zip-compressed" => "application/zip",
            other => other,
        }
    }
    canonical(declared) == canonical(detected)
}

/// Ok when `head` (the first bytes) is of the `declared` type; otherwise why not.
pub fn check(declared: &str, head: &[u8]) -> Result<(), String> {
    match infer::get(head) {
        Some(kind) if same_type(declared, kind.mime_type()) => Ok(()),
        Some(kind) if crate::options::is_scriptable(kind.mime_type()) => Err(format!(
            "the file is HTML or XML ({}, it could run script), not the declared {declared}",
            kind.mime_type()
        )),
        Some(kind) => Err(format!("the file is {}, not the declared {declared}", kind.mime_type())),
        None if looks_like_markup(head) => {
            Err(format!("the file is HTML or XML (it could run script), not the declared {declared}"))
        }
        None => Err(format!("the file's bytes are not recognisable as {declared}")),
    }
}

fn looks_like_markup(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(512)])
        .trim_start_matches('\u{feff}')
        .trim_start()
        .to_ascii_lowercase();
    text.starts_with('<')
}

/// Types complete decodes, strips of metadata and thumbnails.
pub fn is_image(mime: &str) -> bool {
    matches!(mime, "image/jpeg" | "image/png" | "image/gif" | "image/webp")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn html_declared_as_png_is_named_for_what_it_is() {
        let error = check("image/png", b"<!DOCTYPE html><script>alert(1)</script>").unwrap_err();
        assert!(error.contains("HTML"), "{error}");
        let error = check("image/png", b"\xff\xd8\xff\xe0\0\x10JFIF\0").unwrap_err();
        assert!(error.contains("image/jpeg"), "{error}");
        assert!(check("image/png", PNG).is_ok());
        assert!(check("image/jpeg", b"\xff\xd8\xff\xe0\0\x10JFIF\0").is_ok());
        assert!(check("application/pdf", b"plain text").is_err());
    }
}
