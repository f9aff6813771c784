// No public function takes a caller's wait clock any more.
fn skip_my_waits(_clock: &mut prism_stream::WaitClock) {}

fn main() {}
