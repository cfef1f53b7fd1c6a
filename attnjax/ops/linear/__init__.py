"""Linear / recurrent attention: `engine` (one chunked / recurrent / parallel engine for every decay
kind), `delta` (delta rule), `mechanisms`, `feature_maps`, `hybrid`, `titans`. The public ops are
re-exported by `attnjax.ops`."""
