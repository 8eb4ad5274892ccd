/*
 * A Windows executable served as something else.
 *
 * Drive-by downloads and staged malware often fetch the next stage as
 * "logo.png" or "update.txt" with an image/ or text/ Content-Type, to slip
 * past filters that look at names and types.  A real image, stylesheet or
 * text file never starts with a valid PE header, so the mismatch alone is a
 * strong signal.
 *
 * Externals (filled by the gateway per transaction):
 *   direction  only responses: what users download, not what they upload
 *   filetype   the MIME type the HTTP message claims (lowercase, no parameters)
 *   extension  the file name's extension, lowercase (with or without the dot)
 */

rule PE_Disguised_As_Content
{
    meta:
        description = "Windows PE executable served with a non-executable Content-Type or extension"
        severity = "high"

    condition:
        direction == "response"
        and filesize > 0x40
        and uint16(0) == 0x5A4D                       // "MZ"
        and uint32(0x3C) < filesize - 4
        and uint32(uint32(0x3C)) == 0x00004550        // "PE\0\0" at e_lfanew
        // A server that types every unknown file as text/plain still names an
        // installer "setup.exe": an executable extension is not a disguise.
        and not extension matches /^\.?(exe|dll|sys|scr|cpl|ocx|com|msi|efi|drv|mui|bin|dat)$/i
        and (
            filetype matches /^(image|audio|video|font|text)\//i
            or filetype matches /^application\/(pdf|json|xml|javascript|ecmascript|x-javascript)$/i
            or extension matches /^\.?(jpe?g|png|gif|bmp|webp|avif|ico|svg|tiff?|txt|csv|log|css|js|json|xml|html?|pdf|mp3|mp4|wav|ogg|webm|woff2?|ttf|otf)$/i
        )
}
