"""Stage 4: images from label maps with a trained generator (DDIM, noise seeding)."""
