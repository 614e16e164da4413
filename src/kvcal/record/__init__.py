"""The record file: the locked, atomic store; what a merge changed; inspection."""
