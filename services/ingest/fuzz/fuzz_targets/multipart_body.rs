//! Upload bodies as `POST /v1/audio/transcriptions` takes them: a multipart
//! form read field by field, in chunks cut anywhere, with a byte bound.
#![no_main]

use bytes::Bytes;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let step = usize::from(head) + 1;
    let chunks: Vec<Result<Bytes, std::io::Error>> = rest
        .chunks(step)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(1 << 20).per_field(1 << 20));
    let mut form = multer::Multipart::with_constraints(
        futures::stream::iter(chunks),
        "b",
        constraints,
    );
    block_on(async {
        while let Ok(Some(mut field)) = form.next_field().await {
            let _ = (field.name(), field.file_name(), field.content_type());
            while let Ok(Some(_)) = field.chunk().await {}
        }
    });
});
