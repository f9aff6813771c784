// An OpId comes only from the coordinator that queued the op.
fn main() {
    let _id = prism_stream::OpId(3);
}
