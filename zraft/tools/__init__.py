"""Client-side tools: backups (`zraft snapshot`) and the load generator (`zraft bench`)."""
