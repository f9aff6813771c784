//! Batched compression and decompression on prism buffers.
//!
//! A batch is `n` chunks laid out in prism [`DeviceBuffer`]s. Each call
//! uploads the batch's table (chunk addresses and sizes, one prism buffer)
//! through the scope, then queues nvCOMP's batched call as outside work
//! ([`Launch::outside`]) naming every buffer it touches: the input (read),
//! the output (write), the table (read), the sizes nvCOMP writes, the
//! statuses and the temp space (write). prism orders the call after each
//! buffer's conflicting uses and fences it like its own ops, so nothing
//! else touches those bytes while nvCOMP runs and no buffer is freed before
//! it ends. The sizes and statuses are read back without blocking
//! ([`Pending`]) and checked: every status, and for decompression every
//! size against the one recorded.
//!
//! The addresses in the table are taken from the buffers while they are
//! borrowed for the call, and used only by the outside work that names
//! them; the table is rewritten for every call.

use prism_stream::{DeviceBuffer, Element, Lane, Launch, Readback};

use crate::codec::{Alignments, Codec, DataType, RawBatch, Status};
use crate::{Error, Nvcomp, Result};

/// Where one compressed chunk lies in a batch's input buffer and what it
/// decompresses to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkLoc {
    /// First byte of the compressed chunk in the input buffer.
    pub offset: usize,
    /// Compressed bytes.
    pub compressed: usize,
    /// Uncompressed bytes.
    pub uncompressed: usize,
}

/// The prism buffers of one batched call: the table, the sizes and
/// statuses nvCOMP writes, its temp space.
#[derive(Debug)]
struct Scratch {
    /// `[in_ptrs | out_ptrs | in_sizes | out_caps]`, `max_chunks` each.
    table: DeviceBuffer<u64>,
    sizes: DeviceBuffer<usize>,
    statuses: DeviceBuffer<i32>,
    temp: DeviceBuffer<u8>,
    max_chunks: usize,
}

/// The status every chunk starts a call with: no nvCOMP status (any value
/// nvCOMP writes replaces it; one left means the call never wrote it).
const NOT_WRITTEN: i32 = i32::MIN;

/// cuMemAlloc's base alignment: every prism device buffer starts on it.
const BASE_ALIGN: usize = 256;

impl Scratch {
    fn new(
        lane: &mut Lane,
        codec: Codec,
        max_chunks: usize,
        temp_bytes: usize,
        a: Alignments,
    ) -> Result<Self> {
        if a.temp > BASE_ALIGN || a.input > BASE_ALIGN || a.output > BASE_ALIGN {
            return Err(Error::InvalidBatch {
                codec,
                detail: format!(
                    "nvCOMP asks alignments {a:?}, above a device buffer's {BASE_ALIGN}"
                ),
            });
        }
        let table = max_chunks.checked_mul(4).ok_or(Error::InvalidBatch {
            codec,
            detail: format!("{max_chunks} chunks overflow the pointer table"),
        })?;
        Ok(Self {
            table: DeviceBuffer::zeroed(lane, table)?,
            sizes: DeviceBuffer::zeroed(lane, max_chunks)?,
            statuses: DeviceBuffer::zeroed(lane, max_chunks)?,
            temp: DeviceBuffer::zeroed(lane, temp_bytes.max(1))?,
            max_chunks,
        })
    }

    /// Queues `call` on `launch` as outside work over `input`, `output` and
    /// the scratch buffers, after uploading `table`; reads back the sizes
    /// and statuses of `n` chunks.
    fn run<A: Element, B: Element>(
        &mut self,
        launch: &mut Launch<'_>,
        table: &[u64],
        n: usize,
        input: &DeviceBuffer<A>,
        output: &mut DeviceBuffer<B>,
        call: impl FnOnce(RawBatch) -> Result<()>,
    ) -> Result<(Readback<usize>, Readback<i32>)> {
        launch.upload_slice(table, &mut self.table, 0)?;
        // Statuses and sizes start as "not written" for every call, so a
        // call that wrote nothing (a launch failing without a sticky error)
        // cannot pass for the last call's success.
        launch.fill(&mut self.statuses, 0, n, NOT_WRITTEN)?;
        launch.fill(&mut self.sizes, 0, n, 0usize)?;
        let m = self.max_chunks as u64;
        let Scratch {
            table,
            sizes,
            statuses,
            temp,
            ..
        } = self;
        let temp_bytes = temp.num_bytes();
        let mut o = launch.outside();
        // Named so that the call is ordered against their other uses; their
        // addresses are already in the table.
        let _input = o.read(input);
        let _output = o.write(output);
        let tab = o.read(table);
        let sizes_arg = o.write(sizes);
        let status_arg = o.write(statuses);
        let temp_arg = o.write(temp);
        // SAFETY: nvCOMP's batched call touches exactly the buffers named
        // above: it reads the input chunks and the table (named `read`),
        // writes the output chunks, sizes, statuses and temp space (named
        // `write`), within their lengths (the callers check every chunk's
        // offset and size against the buffers, the temp size is the
        // buffer's, and the arrays hold `n <= max_chunks` entries); it
        // enqueues only on the lane's stream handed to it, does not capture
        // it, and keeps no address after the block (the next call rewrites
        // the table). Bitcomp's decompression synchronises the stream (its
        // docs): that only waits for work already ordered, and reaches
        // here only through the unsafe `decompress`.
        let r = unsafe {
            o.run(|w| -> Result<()> {
                let (tab, _) = w.ptr(tab)?;
                let (sizes, _) = w.ptr_mut(&sizes_arg)?;
                let (statuses, _) = w.ptr_mut(&status_arg)?;
                let (temp, _) = w.ptr_mut(&temp_arg)?;
                call(RawBatch {
                    in_ptrs: tab,
                    out_ptrs: tab + 8 * m,
                    in_sizes: tab + 16 * m,
                    out_caps: tab + 24 * m,
                    out_sizes: sizes,
                    n,
                    max_chunk: 0,
                    temp,
                    temp_bytes,
                    statuses,
                    stream: w.stream().cu_stream() as crate::sys::cudaStream_t,
                })
            })
        };
        r??;
        let sizes = launch.read_async(&self.sizes, 0, n)?;
        let statuses = launch.read_async(&self.statuses, 0, n)?;
        Ok((sizes, statuses))
    }
}

/// The table's host form: `[in_ptrs | out_ptrs | in_sizes | out_caps]`.
fn table(m: usize, ins: &[(u64, usize)], outs: &[(u64, usize)]) -> Vec<u64> {
    let mut t = vec![0u64; 4 * m];
    for (i, (&(ip, is), &(op, oc))) in ins.iter().zip(outs).enumerate() {
        t[i] = ip;
        t[m + i] = op;
        t[2 * m + i] = is as u64;
        t[3 * m + i] = oc as u64;
    }
    t
}

/// Batched results on their way back: the sizes nvCOMP wrote and its
/// statuses, checked by [`wait`](Self::wait).
#[derive(Debug)]
pub struct Pending {
    codec: Codec,
    sizes: Readback<usize>,
    statuses: Readback<i32>,
    /// Decompression: the size each chunk must have. Compression: none.
    expected: Option<Vec<usize>>,
    /// Compression: the most a chunk may compress to.
    limit: usize,
}

impl Pending {
    /// True once the results are back (never blocks).
    pub fn is_ready(&self) -> Result<bool> {
        Ok(self.sizes.is_ready()? && self.statuses.is_ready()?)
    }

    /// Waits for this batch's results only, checks every chunk's status
    /// and size, and returns the sizes: the compressed size of each chunk
    /// (compression) or its uncompressed size (decompression).
    pub fn wait(self) -> Result<Vec<usize>> {
        let statuses = self.statuses.wait()?;
        let sizes = self.sizes.wait()?;
        for (chunk, &s) in statuses.iter().enumerate() {
            let status = Status(s);
            if !status.is_success() {
                return Err(Error::ChunkFailed {
                    codec: self.codec,
                    chunk,
                    status,
                });
            }
        }
        match &self.expected {
            Some(expected) => {
                for (chunk, (&actual, &expected)) in sizes.iter().zip(expected).enumerate() {
                    if actual != expected {
                        return Err(Error::SizeMismatch {
                            codec: self.codec,
                            chunk,
                            expected,
                            actual,
                        });
                    }
                }
            }
            None => {
                if let Some((chunk, &actual)) = sizes
                    .iter()
                    .enumerate()
                    .find(|(_, &s)| s == 0 || s > self.limit)
                {
                    return Err(Error::InvalidBatch {
                        codec: self.codec,
                        detail: format!(
                            "chunk {chunk} compressed to {actual} bytes, outside 1..={}",
                            self.limit
                        ),
                    });
                }
            }
        }
        Ok(sizes)
    }
}

/// Compresses chunks of prism buffers with one codec (see the module docs).
#[derive(Debug)]
pub struct Compressor {
    nv: Nvcomp,
    codec: Codec,
    data_type: DataType,
    chunk_bytes: usize,
    max_out: usize,
    stride: usize,
    scratch: Scratch,
}

/// `x` rounded up to a multiple of `to` (> 0).
fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Compressor {
    /// A compressor of up to `max_chunks` chunks of `chunk_bytes` per call,
    /// its buffers allocated (and zeroed) on `lane`. `chunk_bytes` must be a
    /// multiple of the data type's size and of nvCOMP's input alignment, and
    /// at most the codec's limit.
    pub fn new(
        nv: &Nvcomp,
        lane: &mut Lane,
        codec: Codec,
        data_type: DataType,
        chunk_bytes: usize,
        max_chunks: usize,
    ) -> Result<Self> {
        let _span =
            tracing::debug_span!("prism.nvcomp.compressor", %codec, chunk_bytes, max_chunks)
                .entered();
        check_shape(codec, chunk_bytes, max_chunks)?;
        let a = nv.compress_alignments(codec, data_type)?;
        if !chunk_bytes.is_multiple_of(a.input.max(data_type.size())) {
            return Err(Error::InvalidBatch {
                codec,
                detail: format!(
                    "chunk of {chunk_bytes} bytes: must be a multiple of {} (input alignment, element size)",
                    a.input.max(data_type.size())
                ),
            });
        }
        let max_out = nv.max_compressed_bytes(codec, data_type, chunk_bytes)?;
        if max_out == 0 {
            return Err(Error::InvalidBatch {
                codec,
                detail: format!(
                    "nvCOMP reports no room needed to compress chunks of {chunk_bytes} bytes"
                ),
            });
        }
        let stride = round_up(max_out, a.output.max(crate::types::ALIGN));
        let temp = nv.compress_temp_bytes(codec, data_type, max_chunks, chunk_bytes)?;
        let scratch = Scratch::new(lane, codec, max_chunks, temp, a)?;
        Ok(Self {
            nv: nv.clone(),
            codec,
            data_type,
            chunk_bytes,
            max_out,
            stride,
            scratch,
        })
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Uncompressed bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Bytes between two chunks' places in the output: chunk `i` is
    /// written at byte `i * stride()` (room for the most it can take).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Output bytes needed for `input_bytes` of input.
    pub fn output_bytes(&self, input_bytes: usize) -> usize {
        input_bytes.div_ceil(self.chunk_bytes) * self.stride
    }

    /// Queues the compression of `input`'s first `input_bytes` bytes, cut
    /// into chunks of [`chunk_bytes`](Self::chunk_bytes) (the last may be
    /// shorter), into `output` (chunk `i` at byte `i * stride()`); the
    /// result's [`wait`](Pending::wait) gives each chunk's compressed size.
    pub fn compress<A: Element, B: Element>(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<A>,
        input_bytes: usize,
        output: &mut DeviceBuffer<B>,
    ) -> Result<Pending> {
        let codec = self.codec;
        if input_bytes == 0 {
            return Err(Error::ZeroLength {
                what: "compression input",
            });
        }
        if input_bytes > input.num_bytes() {
            return Err(Error::TooSmall {
                what: "compression input buffer",
                needed: input_bytes,
                available: input.num_bytes(),
            });
        }
        if !input_bytes.is_multiple_of(self.data_type.size()) {
            return Err(Error::InvalidBatch {
                codec,
                detail: format!(
                    "{input_bytes} bytes is not a whole number of {:?}",
                    self.data_type
                ),
            });
        }
        let n = input_bytes.div_ceil(self.chunk_bytes);
        if n > self.scratch.max_chunks {
            return Err(Error::TooSmall {
                what: "compressor's chunks per batch",
                needed: n,
                available: self.scratch.max_chunks,
            });
        }
        let needed = n * self.stride;
        if needed > output.num_bytes() {
            return Err(Error::TooSmall {
                what: "compression output buffer",
                needed,
                available: output.num_bytes(),
            });
        }
        // SAFETY: only the addresses are read; they are dereferenced only by
        // the outside work below, which names both buffers.
        let (ib, ob) = unsafe { (input.device_ptr(), output.device_ptr()) };
        let ins: Vec<(u64, usize)> = (0..n)
            .map(|i| {
                let at = i * self.chunk_bytes;
                (ib + at as u64, self.chunk_bytes.min(input_bytes - at))
            })
            .collect();
        let outs: Vec<(u64, usize)> = (0..n)
            .map(|i| (ob + (i * self.stride) as u64, self.max_out))
            .collect();
        let t = table(self.scratch.max_chunks, &ins, &outs);
        let (nv, dt, max_chunk) = (&self.nv, self.data_type, self.chunk_bytes);
        let (sizes, statuses) = self.scratch.run(launch, &t, n, input, output, |mut b| {
            b.max_chunk = max_chunk;
            // SAFETY: the table holds n input chunks inside `input` (at most
            // `max_chunk` bytes each, at multiples of the input alignment)
            // and n output places of `max_out` bytes inside `output` (at
            // multiples of `stride`, itself a multiple of the output
            // alignment), all checked above; the temp space was sized for
            // `max_chunks` chunks of `max_chunk`; `Scratch::run` names every
            // buffer and hands the lane's stream.
            unsafe { nv.compress_async(codec, dt, b) }
        })?;
        Ok(Pending {
            codec,
            sizes,
            statuses,
            expected: None,
            limit: self.max_out,
        })
    }
}

fn check_shape(codec: Codec, chunk_bytes: usize, max_chunks: usize) -> Result<()> {
    if chunk_bytes == 0 {
        return Err(Error::ZeroLength { what: "chunk size" });
    }
    if max_chunks == 0 {
        return Err(Error::ZeroLength {
            what: "chunks per batch",
        });
    }
    if chunk_bytes > codec.max_chunk_bytes() {
        return Err(Error::InvalidBatch {
            codec,
            detail: format!(
                "chunk of {chunk_bytes} bytes, above the codec's {}",
                codec.max_chunk_bytes()
            ),
        });
    }
    Ok(())
}

/// Decompresses batches of chunks of one codec into prism buffers (see the
/// module docs).
#[derive(Debug)]
pub struct Decompressor {
    nv: Nvcomp,
    codec: Codec,
    chunk_bytes: usize,
    align: Alignments,
    scratch: Scratch,
}

impl Decompressor {
    /// A decompressor of up to `max_chunks` chunks of at most `chunk_bytes`
    /// (uncompressed) per call, its buffers allocated (and zeroed) on `lane`.
    pub fn new(
        nv: &Nvcomp,
        lane: &mut Lane,
        codec: Codec,
        chunk_bytes: usize,
        max_chunks: usize,
    ) -> Result<Self> {
        let _span =
            tracing::debug_span!("prism.nvcomp.decompressor", %codec, chunk_bytes, max_chunks)
                .entered();
        check_shape(codec, chunk_bytes, max_chunks)?;
        let align = nv.decompress_alignments(codec)?;
        if !chunk_bytes.is_multiple_of(align.output) {
            return Err(Error::InvalidBatch {
                codec,
                detail: format!(
                    "chunk of {chunk_bytes} bytes is not a multiple of the output alignment {}",
                    align.output
                ),
            });
        }
        let temp = nv.decompress_temp_bytes(codec, max_chunks, chunk_bytes)?;
        let scratch = Scratch::new(lane, codec, max_chunks, temp, align)?;
        Ok(Self {
            nv: nv.clone(),
            codec,
            chunk_bytes,
            align,
            scratch,
        })
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Alignment each compressed chunk's offset must have.
    pub fn input_alignment(&self) -> usize {
        self.align.input
    }

    /// Queues the decompression of `chunks` (compressed in `input`) into
    /// `output`: chunk `i` goes to byte `i * chunk_bytes`, so every chunk
    /// but the last must expand to exactly `chunk_bytes` and the output
    /// is contiguous. The result's [`wait`](Pending::wait) checks each
    /// chunk's status and that it expanded to its recorded size.
    ///
    /// # Safety
    ///
    /// Each of `chunks` must delimit exactly one whole chunk that nvCOMP's
    /// compressor made with this codec (and, for Cascaded and Bitcomp, one
    /// data type for the whole batch): made in this process, or read from
    /// a chunk file whose chunks were. [`ChunkFileWriter`](crate::format::ChunkFileWriter)
    /// records whatever bytes it is given, so a file vouches only for what
    /// its writer pushed; its checksums catch accidents, not a crafted
    /// file. nvCOMP's decoders do not all withstand corrupt input (its
    /// docs call it undefined behaviour for Deflate, GDeflate, Cascaded and
    /// Bitcomp; on an H100, 2026-12-08, Zstd decompression of corrupted
    /// bytes faulted with `CUDA_ERROR_ILLEGAL_ADDRESS`, an access outside
    /// the buffers prism handed it, which may touch other memory).
    pub unsafe fn decompress<A: Element, B: Element>(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<A>,
        chunks: &[ChunkLoc],
        output: &mut DeviceBuffer<B>,
    ) -> Result<Pending> {
        let codec = self.codec;
        let n = chunks.len();
        if n == 0 {
            return Err(Error::ZeroLength {
                what: "decompression batch",
            });
        }
        if n > self.scratch.max_chunks {
            return Err(Error::TooSmall {
                what: "decompressor's chunks per batch",
                needed: n,
                available: self.scratch.max_chunks,
            });
        }
        let mut total = 0usize;
        for (i, c) in chunks.iter().enumerate() {
            let bad = |detail: String| {
                Err(Error::InvalidBatch {
                    codec,
                    detail: format!("chunk {i}: {detail}"),
                })
            };
            if c.compressed == 0 || c.uncompressed == 0 {
                return bad(format!(
                    "empty ({} compressed, {} uncompressed bytes)",
                    c.compressed, c.uncompressed
                ));
            }
            if c.uncompressed > self.chunk_bytes
                || (i + 1 < n && c.uncompressed != self.chunk_bytes)
            {
                return bad(format!(
                    "expands to {} bytes; every chunk holds {} (the last at most that)",
                    c.uncompressed, self.chunk_bytes
                ));
            }
            if !c.offset.is_multiple_of(self.align.input) {
                return bad(format!(
                    "offset {} is not a multiple of {}",
                    c.offset, self.align.input
                ));
            }
            let end = c.offset.saturating_add(c.compressed);
            if end > input.num_bytes() {
                return Err(Error::TooSmall {
                    what: "compressed input buffer",
                    needed: end,
                    available: input.num_bytes(),
                });
            }
            total += c.uncompressed;
        }
        if total > output.num_bytes() {
            return Err(Error::TooSmall {
                what: "decompression output buffer",
                needed: total,
                available: output.num_bytes(),
            });
        }
        // SAFETY: only the addresses are read; they are dereferenced only by
        // the outside work below, which names both buffers.
        let (ib, ob) = unsafe { (input.device_ptr(), output.device_ptr()) };
        let ins: Vec<(u64, usize)> = chunks
            .iter()
            .map(|c| (ib + c.offset as u64, c.compressed))
            .collect();
        let outs: Vec<(u64, usize)> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (ob + (i * self.chunk_bytes) as u64, c.uncompressed))
            .collect();
        let t = table(self.scratch.max_chunks, &ins, &outs);
        let nv = &self.nv;
        let (sizes, statuses) = self.scratch.run(launch, &t, n, input, output, |b| {
            // SAFETY: the table holds n compressed chunks inside `input` at
            // aligned offsets, and n output places inside `output` whose
            // capacities (each chunk's recorded size) sum to at most its
            // bytes, all checked above; nvCOMP writes no more than a
            // place's capacity (an overflow is a status); the temp space was
            // sized for `max_chunks` chunks of `chunk_bytes`; the chunks are
            // nvCOMP's own output for this codec (`decompress`'s contract:
            // nvCOMP's decoders are not all safe on corrupt input, whatever
            // the backend); `Scratch::run` names every buffer and hands the
            // lane's stream.
            unsafe { nv.decompress_async(codec, b) }
        })?;
        Ok(Pending {
            codec,
            sizes,
            statuses,
            expected: Some(chunks.iter().map(|c| c.uncompressed).collect()),
            limit: self.chunk_bytes,
        })
    }
}
