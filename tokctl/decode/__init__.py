"""`tokctl decode`: decoding methods over a shared target model and KV cache."""
