/*
 * HTML smuggling: a page that carries its payload inside itself (base64 or a
 * byte array), rebuilds it in the browser as a Blob and saves it through a
 * script-made download.  The file never crosses the network as a file, so
 * filters that look at downloads miss it; this rule looks at the page.
 *
 * Legitimate pages do build Blobs for downloads (CSV export, "save as"), so
 * the rule also asks for an embedded *executable or archive* (the start of a
 * PE, ZIP, 7-Zip or RAR file, base64-encoded as it appears at the start of a
 * base64 literal, or as a decimal byte array) and for a download trigger.
 * Both directions: a smuggling page uploaded to webmail is as bad as one
 * downloaded.
 */

rule HTML_Smuggling_Embedded_Payload
{
    meta:
        description = "Script rebuilds an embedded executable or archive as a Blob and triggers its download"
        reference = "https://attack.mitre.org/techniques/T1027/006/"
        severity = "high"

    strings:
        $blob = /new\s+Blob\s*\(/
        $url = "createObjectURL"
        $save = "msSaveOrOpenBlob"
        $trigger1 = /\.download\s*=/
        $trigger2 = /\.click\s*\(\s*\)/
        $trigger3 = /setAttribute\s*\(\s*["']download["']/
        // Payload starts, base64: "MZ\x90\0\x03\0\0\0\x04\0\0\0", "PK\x03\x04\x14\0",
        // "7z\xbc\xaf\x27\x1c\0", "Rar!\x1a\x07"
        $pe_b64 = "TVqQAAMAAAAEAAAA"
        $zip_b64 = "UEsDBBQA"
        $7z_b64 = "N3q8ryccAA"
        $rar_b64 = "UmFyIRoH"
        // The same starts as a JavaScript byte array: [77,90,144,0,3,...] / [80,75,3,4,...]
        $pe_arr = /\[\s*77\s*,\s*90\s*,\s*144\s*,\s*0\s*,\s*3\s*,/
        $zip_arr = /\[\s*80\s*,\s*75\s*,\s*3\s*,\s*4\s*,/

    condition:
        filesize < 64MB
        and $blob
        and ($url or $save)
        and ($save or any of ($trigger*))
        and any of ($pe_b64, $zip_b64, $7z_b64, $rar_b64, $pe_arr, $zip_arr)
}
