//! The media scenario: upload tickets per second, completes per second,
//! the complete of a 12-megapixel JPEG (decode, re-encode without metadata,
//! thumbnail, BlurHash), and upload throughput through presigned PUTs, all
//! through the SDK against the server's object store.

use std::time::Instant;

use futures::{StreamExt, future::join_all, stream};
use messenger_client::{Client, File};
use messenger_platform::auth::AuthOptions;

use super::{
    BenchOptions,
    clients::{connect_all, drain, histogram, millis},
    report::Media,
    server::Server,
};

const MIB: usize = 1024 * 1024;

/// A PDF's bytes (its magic number, then filler that varies with `seed`):
/// a type complete checks without decoding.
fn pdf(size: usize, seed: u64) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n".to_vec();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while bytes.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(size);
    bytes
}

/// A 4000 x 3000 JPEG (12 megapixels) of gradients and noise, as a phone
/// camera's photo compresses (a few MiB).
fn photo(seed: u64) -> anyhow::Result<Vec<u8>> {
    let (width, height) = (4000u32, 3000u32);
    let mut state = seed | 1;
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state & 0x1f) as u8;
        image::Rgb([(x * 255 / width) as u8 ^ noise, (y * 255 / height) as u8, ((x + y) % 256) as u8 ^ noise])
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 85).encode_image(&image)?;
    Ok(bytes)
}

pub async fn media(options: &BenchOptions, server: &Server, auth: &AuthOptions) -> anyhow::Result<Media> {
    let id = format!("{:x}", messenger_platform::ids::now_ms());
    let clients = options.media_clients.max(1);
    let users: Vec<String> = (0..clients).map(|i| format!("media-{id}-{i}")).collect();
    let peer = format!("media-{id}-peer");
    let fleet = connect_all(&server.endpoint, auth, &users, 64).await?;
    let mut senders: Vec<(Client, String)> = Vec::new();
    for (client, events) in fleet {
        drain(events);
        let conversation = client.direct(&peer).await?.conversation_id;
        senders.push((client, conversation));
    }

    // Tickets: each client asks for its share, all clients at once.
    let per_client = options.media_tickets.div_ceil(clients);
    let file = File::new("application/pdf", "bench.pdf", pdf(100 * 1024, 1));
    let before = server.sample();
    let started = Instant::now();
    let runs = senders.iter().map(|(client, conversation)| {
        let file = file.clone();
        async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let at = Instant::now();
                client.create_upload(conversation, &file).await?;
                latencies.push(at.elapsed());
            }
            Ok::<_, messenger_client::Error>(latencies)
        }
    });
    let mut ticket_latency = histogram();
    for latencies in join_all(runs).await {
        for latency in latencies? {
            let _ = ticket_latency.record((latency.as_micros() as u64).max(1));
        }
    }
    let ticket_seconds = started.elapsed().as_secs_f64();
    let tickets = per_client * clients;
    let ticket_cpu = server.sample().cpu_seconds - before.cpu_seconds;

    // Completes of small files whose bytes are already in storage.
    let per_client = options.media_completes.div_ceil(clients);
    let mut pending: Vec<(usize, String)> = Vec::new();
    for (index, (client, conversation)) in senders.iter().enumerate() {
        for n in 0..per_client {
            let file = File::new("application/pdf", "bench.pdf", pdf(64 * 1024, (index * per_client + n) as u64));
            let ticket = client.create_upload(conversation, &file).await?;
            let media_id = ticket.media_id.clone();
            client.put_upload(ticket, &file.bytes, |_| {}).await?;
            pending.push((index, media_id));
        }
    }
    let completes = pending.len();
    let before = server.sample();
    let started = Instant::now();
    let done = stream::iter(pending)
        .map(|(index, media_id)| {
            let client = &senders[index].0;
            async move { client.complete_upload(&media_id).await.map(drop) }
        })
        .buffer_unordered(clients)
        .collect::<Vec<_>>()
        .await;
    done.into_iter().collect::<Result<Vec<_>, _>>()?;
    let complete_seconds = started.elapsed().as_secs_f64();
    let complete_cpu = server.sample().cpu_seconds - before.cpu_seconds;

    // A 12-megapixel photo: its complete decodes, re-encodes and thumbnails it.
    let (client, conversation) = &senders[0];
    let mut photo_seconds = Vec::new();
    let mut photo_bytes = 0;
    for run in 0..options.media_photos.max(1) {
        let bytes = photo(run as u64 + 1)?;
        photo_bytes = bytes.len();
        let file = File::new("image/jpeg", "photo.jpg", bytes);
        let ticket = client.create_upload(conversation, &file).await?;
        let media_id = ticket.media_id.clone();
        client.put_upload(ticket, &file.bytes, |_| {}).await?;
        let started = Instant::now();
        let attachment = client.complete_upload(&media_id).await?;
        photo_seconds.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(attachment.width == 4000 && attachment.has_thumbnail, "the photo was not processed");
    }
    photo_seconds.sort_by(f64::total_cmp);

    // Upload throughput: one large file in parts, then many small ones at once.
    let large = File::new("application/pdf", "large.pdf", pdf(options.media_large_mib * MIB, 7));
    let started = Instant::now();
    client.upload(conversation, large, |_| {}).await?;
    let large_mib_per_sec = options.media_large_mib as f64 / started.elapsed().as_secs_f64();
    let small: Vec<File> =
        (0..clients * 2).map(|n| File::new("application/pdf", "small.pdf", pdf(4 * MIB, 100 + n as u64))).collect();
    let started = Instant::now();
    let uploads = small.into_iter().enumerate().map(|(n, file)| {
        let (client, conversation) = &senders[n % clients];
        async move { client.upload(conversation, file, |_| {}).await.map(drop) }
    });
    let count = clients * 2;
    join_all(uploads).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let parallel_mib_per_sec = (count * 4) as f64 / started.elapsed().as_secs_f64();

    join_all(senders.iter().map(|(client, _)| client.close())).await;
    Ok(Media {
        clients,
        tickets,
        tickets_per_sec: tickets as f64 / ticket_seconds,
        ticket_p50_ms: millis(&ticket_latency, 0.5),
        ticket_p99_ms: millis(&ticket_latency, 0.99),
        server_cpu_ms_per_ticket: ticket_cpu * 1000.0 / tickets as f64,
        completes,
        completes_per_sec: completes as f64 / complete_seconds,
        server_cpu_ms_per_complete: complete_cpu * 1000.0 / completes as f64,
        photo_bytes,
        photo_complete_p50_s: photo_seconds[photo_seconds.len() / 2],
        large_mib: options.media_large_mib,
        large_upload_mib_per_sec: large_mib_per_sec,
        parallel_uploads: count,
        parallel_upload_mib_per_sec: parallel_mib_per_sec,
    })
}
